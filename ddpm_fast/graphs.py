"""CUDA-graph sampling: one reverse step captured once and replayed for every timestep.

A sampling loop of the paper's U-Net launches about 340 kernels per step; at small batch the GPU
finishes each before the CPU has launched the next, so the loop is bound by launches, not by the
GPU. A CUDA graph records the step's launches once and replays them with one call.

    x_next = step(x, t, t_prev)      captured on static buffers x, t, t_prev; x_next written into x

`StepRunner` holds the static buffers and the step. Uncaptured (any device), `run(i, j)` sets t
and t_prev and calls the step on the static buffers: exactly what the graph would replay, which
the CPU tests check against the plain loop. `capture()` (CUDA only) warms the step up on a side
stream (Triton compiles and autotunes there, cuDNN picks its algorithms), records it, and from
then on `run` replays. The step's noise is drawn inside the graph from a generator of the
runner's own, registered with the graph; before a run it takes the caller's generator state and
hands the advanced state back after, so a captured run consumes the caller's generator exactly
as an uncaptured one does: the same generator gives the same images, captured or not, run after
run. The host never waits inside the loop: the step has no host sync, t is set by a fill.

`GraphCache` keeps the captured runners of one model, least recently used first out, so that
memory held by graphs stays bounded.
"""

import collections
import contextlib

import torch

# "auto" captures a graph on CUDA up to this batch (small batches are bound by kernel launches).
AUTO_MAX_BATCH = 64
CACHE_SIZE = 4


def use_graph(cuda_graph, device: torch.device, batch: int, generator=None) -> bool:
    """Whether a sampling loop on `device` at `batch` runs as a CUDA graph: True, False or "auto".
    Per-image generators (a list) draw outside any graph: "auto" then runs the plain loop."""
    if cuda_graph not in (True, False, "auto"):
        raise ValueError(f"cuda_graph must be True, False or 'auto', got {cuda_graph!r}")
    if isinstance(generator, (list, tuple)):
        if cuda_graph is True:
            raise ValueError("cuda_graph=True takes one generator: per-image generators (a list) draw their noise "
                             "image by image, outside a graph; pass cuda_graph='auto' or False")  # fmt: skip
        return False
    if cuda_graph == "auto":
        return device.type == "cuda" and batch <= AUTO_MAX_BATCH
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device, got {device}")
    return bool(cuda_graph)


def _default_generator(device: torch.device) -> torch.Generator:
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


class StepRunner:
    """Static buffers x, t, t_prev and a step `step_fn(x, t, t_prev, generator) -> x_next`."""

    def __init__(self, step_fn, x: torch.Tensor):
        self.step_fn = step_fn
        self.device = x.device
        self.x = torch.empty_like(x)
        self.t = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        self.t_prev = torch.zeros_like(self.t)
        self.generator = torch.Generator(x.device)  # the one the step draws from; see load()
        self.graph = None

    def step(self) -> None:
        """One reverse step on the static buffers: what the graph records."""
        self.x.copy_(self.step_fn(self.x, self.t, self.t_prev, self.generator))

    def _on_device(self):
        """The buffers' GPU made current: torch.cuda.graph captures, and a graph replays, on the
        current device's streams (x on cuda:1 while cuda:0 is current must still capture there)."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def capture(self, warmup: int = 2) -> None:
        """Record the step in a CUDA graph (after a warmup on a side stream) on the buffers'
        device; the buffers and the generator state are put back as they were."""
        saved_x, saved_rng = self.x.clone(), self.generator.get_state()
        with self._on_device():
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(warmup):
                    self.step()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            graph.register_generator_state(self.generator)
            with torch.cuda.graph(graph):
                self.step()
        self.graph = graph
        self.x.copy_(saved_x)
        self.generator.set_state(saved_rng)

    def load(self, x: torch.Tensor, generator: torch.Generator | None) -> None:
        """Start a run from x, drawing the step noise where `generator` (torch's default when
        None) stands now."""
        self.x.copy_(x)
        self.generator.set_state((generator or _default_generator(x.device)).get_state())

    def run(self, t: int, t_prev: int = -1) -> None:
        self.t.fill_(t)
        self.t_prev.fill_(t_prev)
        if self.graph is not None:
            with self._on_device():
                self.graph.replay()
        else:
            self.step()

    def finish(self, generator: torch.Generator | None) -> torch.Tensor:
        """The result, and the caller's generator advanced past the noise the run drew."""
        (generator or _default_generator(self.x.device)).set_state(self.generator.get_state())
        return self.x.clone()


class GraphCache:
    """Captured StepRunners of one model, keyed by what fixes a graph (sampler, options, shape,
    dtype, device); at most CACHE_SIZE, least recently used dropped first."""

    def __init__(self, size: int = CACHE_SIZE):
        self.size = size
        self._runners: collections.OrderedDict = collections.OrderedDict()

    def get(self, key, make) -> StepRunner:
        if key in self._runners:
            self._runners.move_to_end(key)
            return self._runners[key]
        runner = make()
        self._runners[key] = runner
        while len(self._runners) > self.size:
            self._runners.popitem(last=False)
        return runner

    def clear(self) -> None:
        self._runners.clear()

    def __deepcopy__(self, memo) -> "GraphCache":
        return GraphCache(self.size)  # a copy of a model (its EMA) captures graphs of its own

    def __len__(self) -> int:
        return len(self._runners)
