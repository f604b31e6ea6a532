"""Memory traffic, counted on a CPU: kernels launched and bytes read and written, eager
against fused, per op and for one full sampling step of the paper's 35.7M U-Net.

    python -m ddpm_fast.tools.traffic            # prints the markdown table quoted in the README

Eager: every ATen op the eager path dispatches is caught (torch.utils._python_dispatch,
the layer the torch profiler's op events come from) and counted as one kernel that reads
its tensor inputs and writes its outputs; views and allocations move no data and are not
counted, nor are the argument checks (both paths run the same ones). Fused: the kernels'
own loads and stores, by design (each kernel file's header). Attention's K and V tiles are
loaded once per query block; blocks of one (batch, head) run side by side, so all but the
first load hit L2: they are counted once, as DRAM traffic.
Counts, not timings: they say how much data each path must move, which bounds the time of
these memory-bound ops on a GPU.
"""

import argparse
import contextlib
import math
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ddpm_fast import checks, reference
from ddpm_fast.schedule import POSTERIOR_STEP_BUFFERS, make_betas, schedule_buffers

_FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "detach", "alias"}


@dataclass
class Traffic:
    kernels: int = 0
    read: int = 0
    written: int = 0

    def add(self, kernels: int = 0, read: float = 0, written: float = 0) -> None:
        self.kernels += kernels
        self.read += int(read)
        self.written += int(written)


def _nbytes(t: torch.Tensor) -> int:
    """Bytes a kernel touches in t: its elements, at most its storage (expanded tensors)."""
    return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())


class CountingMode(TorchDispatchMode):
    """Counts every data-moving ATen op as a kernel; `paused()` stops counting for a while."""

    def __init__(self):
        super().__init__()
        self.traffic = Traffic()
        self._paused = 0

    def __enter__(self):
        # Argument checks (t.min(), t.max() ...) are not the op's work: don't count them.
        self._checks = {n: getattr(checks, n) for n in dir(checks) if n.startswith("check_")}
        for name, fn in self._checks.items():
            setattr(checks, name, self._pausing(fn))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, fn in self._checks.items():
            setattr(checks, name, fn)
        return super().__exit__(*exc)

    def _pausing(self, fn):
        def run(*args, **kwargs):
            with self.paused():
                return fn(*args, **kwargs)

        return run

    @contextlib.contextmanager
    def paused(self):
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self._paused:
            return out
        schema = func._schema
        if schema.name.split("::")[-1] in _FREE or any(r.alias_info is not None for r in schema.returns):
            return out  # a view or an allocation: no data moves
        tensors_in = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        tensors_out = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        self.traffic.add(1, sum(map(_nbytes, tensors_in)), sum(map(_nbytes, tensors_out)))
        return out


def count_eager(fn) -> Traffic:
    with CountingMode() as mode:
        fn()
    return mode.traffic


# -- the fused kernels' traffic, by design ---------------------------------------------------


def fused_q_sample(n: int, batch: int, size: int = 4) -> Traffic:
    return Traffic(1, 2 * n * size + batch * 16, n * size)  # x0, eps (+ t, 2 coefficients per sample); x_t


def fused_posterior_step(n: int, batch: int, size: int = 4, noise_in_kernel: bool = False) -> Traffic:
    reads = (2 if noise_in_kernel else 3) * n * size + batch * 28  # x_t, output (, z); t, 5 coefficients
    return Traffic(1, reads, n * size)


def fused_group_norm_silu(x_shape, groups: int, size: int = 4, add: bool = True, backward: bool = False) -> Traffic:
    B, C = x_shape[:2]
    n, params = math.prod(x_shape), 2 * C * 4
    if not backward:  # one kernel per group: x (+ add), gamma, beta; y, mean, rstd
        return Traffic(1, n * size + (B * C * size if add else 0) + params, n * size + 8 * B * groups)
    # x, dy, (add), gamma, beta, mean, rstd; dx, (dadd), per-sample dgamma/dbeta; then their sum over B
    t = Traffic(1, 2 * n * size + (B * C * size if add else 0) + params + 8 * B * groups,
                n * size + (B * C * 4 if add else 0) + 8 * B * C)  # fmt: skip
    t.add(1, 8 * B * C, 2 * C * 4)  # dgamma and dbeta summed over the batch: one kernel for both
    return t


def fused_attention(shape, size: int = 4, backward: bool = False) -> Traffic:
    """q, k, v of (B, H, L, d), each loaded from DRAM once (re-reads of K and V by later
    query blocks, and of Q and dO by later key blocks, are L2 hits: see the module doc)."""
    B, H, L, d = shape
    tile, rows = B * H * L * d * size, B * H * L * 4
    if not backward:
        return Traffic(1, 3 * tile, tile + rows)  # q, k, v; o and the log-sum-exp
    t = Traffic(1, 2 * tile, rows)  # delta = rowsum(dO * O)
    t.add(1, 4 * tile + 2 * rows, 2 * tile)  # dK, dV: q, k, v, dO, lse, delta
    t.add(1, 4 * tile + 2 * rows, tile)  # dQ: the same inputs
    return t


def _plus(a: Traffic, b: Traffic) -> Traffic:
    return Traffic(a.kernels + b.kernels, a.read + b.read, a.written + b.written)


# -- the table --------------------------------------------------------------------------------


def _step_buffers():
    b = schedule_buffers(make_betas("linear", 1000))
    return b, [b[n] for n in POSTERIOR_STEP_BUFFERS]


def op_rows() -> list[tuple[str, Traffic, Traffic]]:
    b, step = _step_buffers()
    rows = []
    x = torch.randn(128, 3, 32, 32)
    t = torch.randint(0, 1000, (128,))
    coefs = (b["sqrt_alphas_cumprod"], b["sqrt_one_minus_alphas_cumprod"])
    rows.append(("q_sample fwd (128, 3, 32, 32)", count_eager(lambda: reference.q_sample(x, t, x, *coefs)),
                 fused_q_sample(x.numel(), 128)))  # fmt: skip
    xs = torch.randn(64, 3, 32, 32)
    ts = torch.randint(1, 1000, (64,))
    rows.append(("posterior step (64, 3, 32, 32)", count_eager(lambda: reference.posterior_step(xs, xs, ts, xs, *step)),
                 fused_posterior_step(xs.numel(), 64)))  # fmt: skip
    shape = (128, 128, 32, 32)
    g = torch.randn(shape, requires_grad=True)
    w, bias = torch.ones(128, requires_grad=True), torch.zeros(128, requires_grad=True)
    a = torch.randn(128, 128, requires_grad=True)
    rows.append(("group_norm_silu + add fwd " + str(shape),
                 count_eager(lambda: reference.group_norm_silu(g, 32, w, bias, 1e-5, add=a)),
                 fused_group_norm_silu(shape, 32)))  # fmt: skip
    y = reference.group_norm_silu(g, 32, w, bias, 1e-5, add=a)
    dy = torch.randn(shape)
    rows.append(("group_norm_silu + add bwd " + str(shape), count_eager(lambda: y.backward(dy)),
                 fused_group_norm_silu(shape, 32, backward=True)))  # fmt: skip
    ashape = (128, 1, 256, 256)
    q = torch.randn(ashape, requires_grad=True)
    rows.append(("attention fwd " + str(ashape), count_eager(lambda: reference.attention(q, q, q)),
                 fused_attention(ashape)))  # fmt: skip
    o = reference.attention(q, q, q)
    do = torch.randn(ashape)
    rows.append(("attention bwd " + str(ashape), count_eager(lambda: o.backward(do)),
                 fused_attention(ashape, backward=True)))  # fmt: skip
    return rows


def sampling_step_row(batch: int = 64, config=None) -> tuple[str, Traffic, Traffic]:
    """One reverse step of the 35.7M U-Net: the U-Net's forward and the posterior step. The
    fused count keeps every other op (convolutions, linears, the attention block's
    projections) as the eager path runs it and puts the kernels' traffic in place of the
    GroupNorm+SiLU pairs, the attention and the posterior step."""
    from ddpm_fast import DDPM, UNet

    torch.manual_seed(0)
    model = UNet(config)
    cfg = model.config
    ddpm = DDPM(model, image_size=cfg.image_size, channels=cfg.in_channels).eval()
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    t = torch.full((batch,), 500, dtype=torch.long)
    with torch.no_grad():
        eager = count_eager(lambda: ddpm.p_sample(x, t))

        fused_extra = Traffic()
        originals = {name: getattr(reference, name) for name in ("group_norm_silu", "attention", "posterior_step")}
        mode = CountingMode()

        def stand_in(name, design):
            def run(*args, **kwargs):
                with mode.paused():
                    out = originals[name](*args, **kwargs)
                d = design(*args, **kwargs)
                fused_extra.add(d.kernels, d.read, d.written)
                return out

            return run

        designs = {
            "group_norm_silu": lambda x, g, *a, add=None: fused_group_norm_silu(x.shape, g, add=add is not None),
            "attention": lambda q, *a, **k: fused_attention(q.shape),
            # z drawn by torch.randn (one kernel writing it), read by the fused step: the default noise
            "posterior_step": lambda x, *a, **k: _plus(
                fused_posterior_step(x.numel(), x.shape[0]), Traffic(1, 0, x.numel() * 4)
            ),
        }
        try:
            for name, design in designs.items():
                setattr(reference, name, stand_in(name, design))
            with mode:
                ddpm.p_sample(x, t)
        finally:
            for name, fn in originals.items():
                setattr(reference, name, fn)
    fused = mode.traffic
    fused.add(fused_extra.kernels, fused_extra.read, fused_extra.written)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    return f"sampling step, {n_params:.1f}M U-Net, batch {batch}", eager, fused


def table(with_sampling_step: bool = True) -> str:
    rows = op_rows() + ([sampling_step_row()] if with_sampling_step else [])
    lines = [
        "| op (float32) | eager kernels | fused kernels | eager MB read+written | fused MB read+written | ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, e, f in rows:
        eb, fb = (e.read + e.written) / 1e6, (f.read + f.written) / 1e6
        lines.append(f"| {name} | {e.kernels} | {f.kernels} | {eb:,.1f} | {fb:,.1f} | {eb / fb:.1f}x |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ddpm_fast.tools.traffic", description=__doc__.split("\n")[0])
    parser.add_argument("--ops-only", action="store_true", help="skip the full sampling step (it takes ~10 s)")
    args = parser.parse_args(argv)
    print(table(with_sampling_step=not args.ops_only))


if __name__ == "__main__":
    main()
