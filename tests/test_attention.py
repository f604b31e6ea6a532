"""kernels.attention against attention computed in float64, under Triton's interpreter."""

import pytest
import torch
from helpers import TOL

from ddpm_fast import kernels, reference
from ddpm_fast.unet import AttnBlock

pytestmark = pytest.mark.on_device  # tensors on the tests' device (conftest.py)


@pytest.fixture(autouse=True)
def _triton_path(monkeypatch):
    monkeypatch.setenv("DDPM_FAST_KERNELS", "triton")


def attention64(q, k, v, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v


def qkv(B, H, L, d, dtype, layout="contiguous"):
    if layout == "contiguous":
        return [torch.randn(B, H, L, d).to(dtype) for _ in range(3)]
    if layout == "token_major":  # what the U-Net's AttnBlock passes: slices of one (B, L, 3 d) GEMM output
        return [t.unsqueeze(1) for t in torch.randn(B, L, 3 * d).to(dtype).chunk(3, dim=-1)]
    if layout == "transposed":  # what the U-Net passes: (B, 1, C, HW) viewed as (B, 1, HW, C)
        return [torch.randn(B, H, d, L).to(dtype).transpose(-1, -2) for _ in range(3)]
    if layout == "strided":  # every other token, head dim not innermost
        return [torch.randn(B, 2 * L, H, d).to(dtype).transpose(1, 2)[:, :, ::2] for _ in range(3)]
    raise ValueError(layout)


def check(q, k, v, grad, dtype, scale=None):
    """Output and dq, dk, dv of the kernel against float64 under the same upstream gradient."""
    fused = [t.detach().requires_grad_() for t in (q, k, v)]
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = kernels.attention(*fused, scale=scale)
    expected = attention64(*ref, scale=scale)
    assert out.dtype == dtype and out.shape == expected.shape
    if isinstance(grad, str):  # "sum": the expanded gradient of out.sum()
        out.sum().backward()
        expected.sum().backward()
    else:
        out.backward(grad.to(dtype))
        expected.backward(grad.double())
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), expected.detach(), **tol)
    for name, f, r in zip("qkv", fused, ref):
        torch.testing.assert_close(f.grad.double(), r.grad, **tol, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("L", [16, 49, 64, 256])
def test_sequence_lengths(L):
    q, k, v = qkv(1, 2, L, 64, torch.float32)
    check(q, k, v, torch.randn(1, 2, L, 64), torch.float32)


@pytest.mark.parametrize("d", [32, 64, 256])
@pytest.mark.parametrize("B", [1, 3])
def test_head_dims_and_batches(B, d):
    q, k, v = qkv(B, 1, 49, d, torch.float32)
    check(q, k, v, torch.randn(B, 1, 49, d), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 2, 49, 64), (1, 1, 64, 256), (1, 3, 16, 32)], ids=str)
def test_half_dtypes(shape, dtype):
    """bfloat16 runs with its tiles widened to float32 before tl.dot under the interpreter
    (its bfloat16 tl.dot is wrong); see the contract in kernels/attention.py."""
    q, k, v = qkv(*shape, dtype)
    check(q, k, v, torch.randn(shape), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_unets_own_layout(dtype):
    """q, k, v as the fused AttnBlock produces them: views of one (B, HW, 3C) tensor, head dim
    contiguous, row stride 3C; the paper's 16x16 map at a reduced width."""
    q, k, v = qkv(2, 1, 256, 64, dtype, "token_major")
    assert q.stride() == (256 * 192, 256 * 192, 192, 1)
    check(q, k, v, torch.randn(2, 1, 256, 64), dtype)


@pytest.mark.parametrize("layout, L", [("transposed", 49), ("transposed", 64), ("strided", 49)])
def test_non_contiguous_inputs(layout, L):
    q, k, v = qkv(2, 1, L, 32, torch.float32, layout)
    assert not q.is_contiguous()
    check(q, k, v, torch.randn(2, 1, L, 32), torch.float32)


def test_only_views_the_tiles_cannot_read_in_place_are_copied():
    """A transposed view is read in place where its strides are multiples of 16 elements (L % 16
    == 0) and copied to token-major where not (its tiles would load element by element and spill);
    head-dim-contiguous layouts, the U-Net's token-major one included, are always read in place."""
    import importlib

    tile_friendly = importlib.import_module("ddpm_fast.kernels.attention")._tile_friendly
    for layout, L, copied in (("transposed", 49, True), ("transposed", 64, False), ("strided", 49, False),
                              ("token_major", 49, False), ("contiguous", 49, False)):  # fmt: skip
        x = qkv(2, 1, L, 32, torch.float32, layout)[0]
        y = tile_friendly(x)
        assert torch.equal(x, y) and (y.data_ptr() != x.data_ptr()) == copied, (layout, L)
        assert not copied or y.stride(-1) == 1


@pytest.mark.parametrize("grad_kind", ["sum", "strided"])
def test_non_contiguous_upstream_gradients(grad_kind):
    q, k, v = qkv(3, 2, 16, 32, torch.float32)
    grad = "sum" if grad_kind == "sum" else torch.randn(3, 2, 16, 64)[..., ::2]
    check(q, k, v, grad, torch.float32)


@pytest.mark.parametrize(
    "d, dv, L, layout",
    [(128, 128, 17, "contiguous"), (200, 72, 20, "strided"), (256, 32, 32, "transposed")],
)
def test_chunked_head_dims(monkeypatch, d, dv, L, layout):
    """float32 without TF32 (3xTF32) runs chunked past TF32X3_HOLD (forward d > 128, backward
    d > 64): q k^T and dO v^T summed a chunk of the head dim at a time, and at d > 128 each
    block of rows split over programs that write one chunk of the outputs' head dim each. Odd
    dims, a value dim that differs (chunks past it masked out), strided and transposed inputs."""
    import importlib

    attention_module = importlib.import_module("ddpm_fast.kernels.attention")
    plan_module = importlib.import_module("ddpm_fast.kernels.attention_plan")
    for module, cache in ((plan_module, "_FWD_PLANS"), (attention_module, "_CALLS")):  # plans made before this
        monkeypatch.setattr(module, cache, type(getattr(module, cache))())  # test would not ask _split again
    launched = []
    split = plan_module._split
    for module in (plan_module, attention_module):  # the forward's plan and the backward's launcher ask it
        monkeypatch.setattr(module, "_split", lambda *a: launched.append((a[-1], split(*a))) or launched[-1][1])
    q, k = qkv(2, 1, L, d, torch.float32, layout)[:2]
    v = qkv(2, 1, L, dv, torch.float32, layout)[0]
    check(q, k, v, torch.randn(2, 1, L, dv), torch.float32)
    used = {kernel: (meta["SPLIT"], meta["R_CHUNK"] > 0) for kernel, meta in launched}
    bwd = (2 if d > 128 else 1, True)
    assert used == {"fwd": (2, True) if d > 128 else (1, False), "dkdv": bwd, "dq": bwd}, launched


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_head_dim_512_runs_chunked_in_every_dtype(monkeypatch, dtype):
    """One head of 512 channels (the google/ddpm-*-256 checkpoints' 16x16 attention): past
    HOLD every precision runs chunked, the outputs' head dim split over programs (half: 2 of
    256; float32: 4 of 128 forward, 8 of 64 backward), forward and backward, at an odd token count with the U-Net's
    token-major layout."""
    import importlib

    attention_module = importlib.import_module("ddpm_fast.kernels.attention")
    plan_module = importlib.import_module("ddpm_fast.kernels.attention_plan")
    for module, cache in ((plan_module, "_FWD_PLANS"), (attention_module, "_CALLS")):
        monkeypatch.setattr(module, cache, type(getattr(module, cache))())
    launched = []
    split = plan_module._split
    for module in (plan_module, attention_module):
        monkeypatch.setattr(module, "_split", lambda *a: launched.append((a[-1], split(*a))) or launched[-1][1])
    q, k, v = qkv(1, 1, 21, 512, dtype, "token_major")
    check(q, k, v, torch.randn(1, 1, 21, 512), dtype)
    used = {kernel: (meta["SPLIT"], meta["R_CHUNK"] > 0) for kernel, meta in launched}
    half = dtype != torch.float32
    bwd = (2 if half else 8, True)
    assert used == {"fwd": (2 if half else 4, True), "dkdv": bwd, "dq": bwd}, launched


def test_value_dim_and_scale_can_differ():
    q, k = qkv(2, 1, 20, 16, torch.float32)[:2]
    v = torch.randn(2, 1, 20, 40)
    check(q, k, v, torch.randn(2, 1, 20, 40), torch.float32, scale=0.3)


def saved_bytes(op, L, d=32):
    """Bytes autograd keeps between forward and backward for op on (1, 1, L, d) inputs."""
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    q, k, v = (torch.randn(1, 1, L, d, requires_grad=True) for _ in range(3))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        op(q, k, v)
    return sum(sizes)


def test_saved_memory_is_linear_in_sequence_length():
    fused = saved_bytes(kernels.attention, 64), saved_bytes(kernels.attention, 256)
    eager = saved_bytes(reference.attention, 64), saved_bytes(reference.attention, 256)
    # q, k, v, the output (4 L d floats) and the log-sum-exp (L floats): nothing L x L.
    assert fused == tuple(4 * (4 * L * 32 + L) for L in (64, 256))
    assert fused[1] == 4 * fused[0]
    assert eager[1] > 10 * eager[0] and eager[1] > 256 * 256 * 4  # keeps the L x L probabilities


def test_attention_block_fused_matches_eager():
    block = AttnBlock(32, 8)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    x = torch.randn(3, 32, 5, 7)
    grad = torch.randn(3, 32, 5, 7)
    results = []
    for fused in (True, False):
        block.fused = fused
        block.zero_grad()
        xi = x.clone().requires_grad_()
        out = block(xi)
        out.backward(grad)
        results.append([out.detach(), xi.grad] + [p.grad.clone() for p in block.parameters()])
    for f, e in zip(*results):
        torch.testing.assert_close(f, e, rtol=1e-4, atol=1e-5)


def test_bad_inputs_are_named():
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(ValueError, match="^k must have the shape of q"):
        kernels.attention(q, torch.randn(1, 1, 9, 16), q)
    with pytest.raises(ValueError, match="^v must have shape"):
        kernels.attention(q, q, torch.randn(1, 2, 8, 16))
    with pytest.raises(TypeError, match="^k has dtype torch.float16"):
        kernels.attention(q, q.half(), q)
    with pytest.raises(ValueError, match="^q must have 4 dimensions"):
        kernels.attention(q[0], q[0], q[0])
    big = torch.randn(1, 1, 8, 600)
    with pytest.raises(ValueError, match="^q's head dim must be in \\[1, 512\\], got 600"):
        kernels.attention(big, big, big)


def _tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 x rounded to TF32 (10 mantissa bits, to nearest, ties away from zero: what the
    GPU's cvt.rna.tf32.f32 does before a TF32 MMA)."""
    return ((x.view(torch.int32) + 0x1000) & -0x2000).view(torch.float32)


def _mm_3xtf32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as Triton's input_precision="tf32x3" computes it: each operand split into a TF32
    high part and a TF32 remainder, three products (hi hi, hi lo, lo hi) accumulated in float32."""
    a_hi, b_hi = _tf32(a), _tf32(b)
    a_lo, b_lo = _tf32(a - a_hi), _tf32(b - b_hi)
    return a_lo @ b_hi + a_hi @ b_lo + a_hi @ b_hi


@pytest.mark.parametrize("d", [32, 64, 128, 256, 512])
def test_3xtf32_dots_hold_float32_accuracy(d):
    """The part of float32 attention the interpreter cannot run (its dots are IEEE whatever the
    precision): on a GPU with TF32 off, float32 attention multiplies as 3xTF32, q k^T summed over
    chunks of the head dim where the kernel runs chunked (TF32X3_CHUNKED). Emulated bit for bit
    in its rounding (not in the MMA's accumulation order), attention over 256 tokens holds the
    float32 tolerance against float64, where a single TF32 product does not: so the choice keeps
    the float32 contract. The compiled kernel itself is held to the same tolerance on a GPU
    (these tests' float32 cases there, and `ddpm-fast check`)."""
    from ddpm_fast.kernels.attention_plan import TF32X3_CHUNKED, TF32X3_HOLD

    chunk = d if d <= TF32X3_HOLD["fwd"] else TF32X3_CHUNKED["fwd"][d][1]
    q, k, v = (t.float() for t in qkv(2, 1, 256, d, torch.float32, "token_major"))
    expected = attention64(q.double(), k.double(), v.double())

    def attention_with(mm):
        scores = sum(mm(q[..., c : c + chunk], k[..., c : c + chunk].transpose(-1, -2)) for c in range(0, d, chunk))
        return mm(torch.softmax(scores * d**-0.5, dim=-1), v)

    torch.testing.assert_close(attention_with(_mm_3xtf32).double(), expected, **TOL[torch.float32])
    with pytest.raises(AssertionError):  # one TF32 product per dot: ~1e-3 off
        torch.testing.assert_close(attention_with(lambda a, b: _tf32(a) @ _tf32(b)).double(), expected,
                                   **TOL[torch.float32])  # fmt: skip
