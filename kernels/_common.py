"""What every fused op shares: the path switch and small launcher helpers.

The path switch (DESIGN.md): the environment variable DDPM_FAST_KERNELS, or
`set_kernel_mode`, picks for every fused op
  auto    the Triton kernel on CUDA tensors, and on CPU tensors when Triton's interpreter
          is on (TRITON_INTERPRET=1, set before triton is imported); else the eager twin;
  eager   always the eager twin in ddpm_fast.reference;
  triton  always the Triton kernel (on a CPU without the interpreter the launch fails).
"""

import contextlib
import functools
import os

import torch

KERNEL_MODES = ("auto", "eager", "triton")
_ENV = "DDPM_FAST_KERNELS"

try:  # triton ships wheels for Linux only; elsewhere every op runs its eager twin
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False


# The switch is read on every call (a user may set it at any time), so it is read cheaply: from the
# mapping behind os.environ, which every os.environ write updates, with the key encoded once
# (os.environ.get encodes the key and decodes the value per call: ~0.7 us, half a small ATen op).
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(_ENV) if _ENV_DATA is not None and hasattr(os.environ, "encodekey") else None
_MODE_OF = {os.environ.encodevalue(m): m for m in KERNEL_MODES} if _ENV_KEY is not None else {}


def get_kernel_mode() -> str:
    if _ENV_KEY is not None:
        raw = _ENV_DATA.get(_ENV_KEY)
        if raw is None:
            return "auto"
        mode = _MODE_OF.get(raw)
        if mode is not None:
            return mode
    mode = os.environ.get(_ENV)
    if mode is None or mode in KERNEL_MODES:
        return mode or "auto"
    mode = mode.strip().lower() or "auto"
    if mode not in KERNEL_MODES:
        raise ValueError(f"{_ENV} must be one of {KERNEL_MODES}, got {mode!r}")
    return mode


def set_kernel_mode(mode: str) -> None:
    """Pick the path of every fused op: 'auto', 'eager' or 'triton' (sets DDPM_FAST_KERNELS)."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"mode must be one of {KERNEL_MODES}, got {mode!r}")
    os.environ[_ENV] = mode


@contextlib.contextmanager
def kernel_mode(mode: str):
    """`with kernel_mode("eager"): ...` runs the block on one path, then restores the old one."""
    old = os.environ.get(_ENV)
    set_kernel_mode(mode)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(_ENV, None)
        else:
            os.environ[_ENV] = old


# Triton decides at import (when @triton.jit runs) whether kernels are interpreted, so
# the switch reads TRITON_INTERPRET once, at the same moment.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_on() -> bool:
    return INTERPRET


_GPU_PLANS = []  # non-empty inside gpu_plans()
_ALL_PLANS: list = []  # every Plans cache, cleared where the planning target changes


def plans_for_interpreter(device: torch.device) -> bool:
    """Whether launches on `device` are planned for Triton's interpreter, not for a GPU: CPU
    tensors with the interpreter on. The interpreter runs a grid's programs one after another on
    one core, each costing ~10 ms of Python whatever its tile, so its plans use as few programs
    as the tiles allow (every group of a sample in one GroupNorm program, no split for more
    programs) where a GPU's plan spreads the work over its SMs. The kernels are the same; only
    the grid and the tile sizes differ. gpu_plans() turns this off (the kernel tests check the
    plans a GPU runs); ddpm_fast.tools.aot runs without the interpreter, so it records GPU plans."""
    return INTERPRET and device.type == "cpu" and not _GPU_PLANS


@contextlib.contextmanager
def gpu_plans():
    """Within the block, CPU tensors under the interpreter get the launch plans a GPU would run."""
    _GPU_PLANS.append(True)
    _clear_plans()
    try:
        yield
    finally:
        _GPU_PLANS.pop()
        _clear_plans()


def _clear_plans() -> None:
    for plans in _ALL_PLANS:
        plans.clear()


def fix_old_interpreter() -> None:
    """Make Triton 3.6's interpreter run our kernels under NumPy >= 2.4 (call it where the
    interpreter runs: the tests' conftest, `ddpm-fast check` on a CPU; never on import).

    That interpreter holds each scalar kernel argument as a one-element 1-D numpy array and takes
    int() of it where Python needs an index, as every `range(0, L, BLOCK)` loop bound does: NumPy
    2.4 refuses int() of a 1-D array (earlier NumPy warned, which torch.library.opcheck turns into
    an error). Triton 3.7 and later take int() of the squeezed array; this makes 3.6 do the same.
    Compiled kernels never meet it: a GPU does not run the interpreter."""
    import triton

    major, minor = (int(v) for v in triton.__version__.split(".")[:2])
    if (major, minor) >= (3, 7):
        return
    from triton.runtime import interpreter

    patch = interpreter._patch_lang_tensor
    if getattr(patch, "_ddpm_fast_fix", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._ddpm_fast_fix = True
    interpreter._patch_lang_tensor = patched


def speed_up_interpreter() -> None:
    """Skip the interpreter's re-patching of triton.language at every call of a @triton.jit
    helper inside a running kernel (call it where fix_old_interpreter is called).

    Triton's interpreter (3.6 to 3.8 at least) patches triton.language once per launch and then
    again, to the same effect, at each call of a helper function: ~2.5 ms of `inspect.getmembers`
    per call, ~40% of the interpreter's time in our kernels (which call helpers in every program).
    Here a helper's call inside a running launch skips the patch when the launch's patch already
    covers the language modules the helper sees; the launch still patches and restores as before.
    Where Triton's interpreter is not shaped as expected, nothing is changed."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover
        return
    real = getattr(interpreter, "_patch_lang", None)
    if real is None or getattr(real, "_ddpm_fast_skip", False) or not hasattr(interpreter, "_LangPatchScope"):
        return
    running: list[frozenset] = []  # the language modules patched by the launch that runs

    def langs(fn) -> frozenset:
        return frozenset(id(v) for v in fn.__globals__.values() if v is tl or v is tl.core)

    class _Launch:  # the launch's own scope, which also ends `running`
        def __init__(self, scope):
            self.scope = scope

        def restore(self):
            running.clear()
            self.scope.restore()

    def _patch_lang(fn):
        seen = langs(fn)
        if running and seen and seen <= running[-1]:
            return interpreter._LangPatchScope()  # a helper inside the launch: already patched
        scope = real(fn)
        if running:  # a helper seeing other modules (triton.language.core, from tl.sum):
            running[-1] |= seen  # patched as Triton does (never restored), once per launch
            return scope
        running.append(seen)
        return _Launch(scope)

    _patch_lang._ddpm_fast_skip = True
    interpreter._patch_lang = _patch_lang


def use_triton(device: torch.device) -> bool:
    """Whether an op on tensors of `device` launches its Triton kernel."""
    mode = get_kernel_mode()
    if mode == "eager":
        return False
    if not HAS_TRITON:
        if mode == "triton":
            raise RuntimeError(f"{_ENV}=triton but triton is not installed")
        return False
    if mode == "triton":
        return True
    kind = _device_type(device)
    return kind == "cuda" or (kind == "cpu" and interpreter_on())


_DEVICE_TYPES: dict = {}


def _device_type(device: torch.device) -> str:
    """device.type, looked up: the property builds a new string per read (~0.2 us)."""
    kind = _DEVICE_TYPES.get(device)
    if kind is None:
        kind = _DEVICE_TYPES[device] = device.type
    return kind


def path_setting() -> str:
    """What decides the ops' path, for messages: "DDPM_FAST_KERNELS=auto, Triton interpreter off"."""
    return f"DDPM_FAST_KERNELS={get_kernel_mode()}, Triton interpreter {'on' if interpreter_on() else 'off'}"


def tf32_matmul() -> bool:
    """Whether torch lets float32 CUDA matmuls run in TF32, read as torch itself resolves it: the
    `fp32_precision` API ("none" means not set), then the legacy flag
    torch.backends.cuda.matmul.allow_tf32, which raises when read after a user set the new API
    (so it is read only where the new one is unset). Read per call (a user may change it at any
    time) straight from torch._C, where the Python properties cost ~2 small ATen ops each."""
    precision = _FP32_PRECISION()
    if precision not in (None, "none"):
        return precision == "tf32"
    try:
        return bool(_LEGACY_TF32())
    except RuntimeError:  # the legacy and the new API both used: torch refuses to say
        return False


def _fp32_precision_getter():
    """The reader of torch.backends.cuda.matmul.fp32_precision as torch resolves it: torch's own
    getter falls back from the matmul setting to torch.backends.cuda's and then to
    torch.backends.fp32_precision (checked on torch 2.11 and 2.14: `torch.backends.fp32_precision
    = "tf32"` alone reads "tf32" here), so one read answers for all three."""
    getter = getattr(torch._C, "_get_fp32_precision_getter", None)
    if getter is not None:  # a partial: called in C, no Python frame per read
        return functools.partial(getter, "cuda", "matmul")

    def read():  # pragma: no cover (a torch without the C getter: its Python properties, in order)
        for owner in (torch.backends.cuda.matmul, torch.backends):
            precision = getattr(owner, "fp32_precision", None)
            if precision not in (None, "none"):
                return precision
        return None

    return read


_FP32_PRECISION = _fp32_precision_getter()
_LEGACY_TF32 = getattr(torch._C, "_get_cublas_allow_tf32", lambda: torch.backends.cuda.matmul.allow_tf32)


def launch_device(device: torch.device):
    """A context in which Triton launches on `device`: Triton launches on the current CUDA device
    (and its current stream), so a tensor on another GPU makes its device current first; nothing
    to do where it already is current, or off CUDA."""
    index = device.index  # None off CUDA (and for the current CUDA device): read first, it is cheap
    if index is not None and _device_type(device) == "cuda" and index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return _NO_SWITCH


_NO_SWITCH = contextlib.nullcontext()  # reentrant and stateless: one serves every launch


def on_input_device(launcher):
    """Decorates a launcher whose first argument is a tensor: its kernels launch on that tensor's
    device (launch_device), whichever GPU is current."""

    @functools.wraps(launcher)
    def launch(x, *args, **kwargs):
        with launch_device(x.device):
            return launcher(x, *args, **kwargs)

    return launch


# -- the host path: what a call costs before its kernel launches ------------------------------------

_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))
_PLAIN_OR_NONE = _PLAIN | {type(None)}
# bound once: each is read on every call, and a module attribute costs a lookup per level
_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_transforms_active = torch._C._are_functorch_transforms_active
_grad_enabled = torch.is_grad_enabled


def direct_launch(*tensors) -> bool:
    """Whether a fused op may call its launcher itself instead of going through its torch.library
    custom op, whose dispatch alone costs ~6 small ATen ops on the host: the Triton path is on for
    the first tensor's device (use_triton), in plain eager execution, with no gradient wanted from
    the call. Where torch.compile traces, a dispatch mode is active (FakeTensorMode,
    ddpm_fast.tools.aot's recorder), a functorch transform runs, a tensor is a subclass, or autograd
    needs the op's formula, the custom op runs: the same launcher either way. None stands for an
    absent optional tensor."""
    if _is_compiling() or _dispatch_modes() or _transforms_active():
        return False
    if _grad_enabled():
        for t in tensors:
            if t is not None and (type(t) not in _PLAIN or t.requires_grad):
                return False
    else:  # (the common case, sampling: one set lookup per tensor)
        for t in tensors:
            if type(t) not in _PLAIN_OR_NONE:
                return False
    return use_triton(tensors[0].device)


def meta_key(x: torch.Tensor | None) -> tuple | None:
    """What a launch plan may depend on of a tensor: shape, strides, dtype, device."""
    return None if x is None else (x.shape, x.stride(), x.dtype, x.device)


class Plans:
    """Per-call work that depends only on the arguments' metadata (and the op's options): the
    checks of that metadata, the grid, block sizes, warps, the strides passed to the kernel and
    the output's layout, computed once per key and then looked up. A key holds every value the
    plan reads, so a hit is exactly what a fresh computation would give; the dict is cleared when
    it reaches MAX entries (a process cycling through more shapes than that recomputes)."""

    MAX = 1024

    def __init__(self):
        # key -> entry; a hot caller looks up `entries.get(key)` itself (no Python frame, no closure
        # per call) and builds on a miss (add). Not a bound `get` kept on the object: torch 2.11's
        # dynamo refuses to trace that (a graph break under torch.compile), and traces this.
        self.entries: dict = {}
        _ALL_PLANS.append(self)

    def clear(self) -> None:
        self.entries.clear()

    def get(self, key, build):
        plan = self.entries.get(key)
        if plan is None:
            plan = self.add(key, build())
        return plan

    def add(self, key, plan):
        if len(self.entries) >= self.MAX:
            self.entries.clear()
        self.entries[key] = plan
        return plan


def cdiv(a: int, b: int) -> int:
    """triton.cdiv in plain Python (the helper costs a call through triton's constexpr unwrapping)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """triton.next_power_of_2 in plain Python (0 for 0, as triton gives)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def row_order(x: torch.Tensor) -> list[int]:
    """The order in which an elementwise kernel walks x's dims: the batch first, the others as
    they lie in memory (largest stride first) when x is dense with the batch outermost, so that a
    channels_last tensor is read in its own order without a copy; else the logical order."""
    dims = list(range(1, x.ndim))
    ordered = [0] + sorted(dims, key=lambda d: -x.stride(d))
    if x.ndim > 1 and x.stride(0) >= max(x.stride(d) * x.shape[d] for d in dims) and _dense(x.permute(ordered)):
        return ordered
    return list(range(x.ndim))


def _dense(x: torch.Tensor) -> bool:
    """x's elements fill one block of memory in row-major order (trailing dims collapse)."""
    expected = 1
    for size, stride in reversed(list(zip(x.shape[1:], x.stride()[1:]))):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def as_rows(x: torch.Tensor, order: list[int] | None = None) -> torch.Tensor:
    """x as a (B, N) view, N = all but the batch dim in `order` (row_order of the op's main input),
    whose rows the kernels walk with (stride_b, stride_n). A view when those dims collapse
    (contiguous, channels_last, sliced along the batch, expanded); a copy otherwise."""
    if order is not None and order != list(range(x.ndim)):
        x = x.permute(order)
    return x.reshape(x.shape[0], -1)


def elementwise_out(x: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, list[int]]:
    """The output of an elementwise op led by x, in x's layout where row_order keeps it (so a
    channels_last input gives a channels_last output), and the dim order to walk both in."""
    order = row_order(x)
    dtype = dtype or x.dtype
    if order == list(range(x.ndim)):
        return torch.empty(x.shape, dtype=dtype, device=x.device), order
    inverse = sorted(range(x.ndim), key=lambda d: order[d])
    out = torch.empty([x.shape[d] for d in order], dtype=dtype, device=x.device).permute(inverse)
    return out, order


def elementwise_block(n: int) -> int:
    """Block size for an elementwise kernel over rows of n elements."""
    return max(16, min(1024, next_power_of_2(n)))
