"""DDPM (Ho, Jain & Abbeel, 2020): the forward process, the training loss and the samplers.

Training (Algorithm 1) and sampling (Algorithm 2) are kept apart. The elementwise maths
of q_sample and of one reverse step is done by the ops in ddpm_fast.reference (eager)
or ddpm_fast.kernels (fused), picked by the `fused` flag, which also switches the
U-Net's GroupNorm+SiLU and attention when the model supports it.
"""

import os
import sys
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ddpm_fast import checks, graphs, reference
from ddpm_fast.profiling import nvtx_range
from ddpm_fast.schedule import BETA_END, BETA_START, NOT_IN_STATE_DICT, extract, make_betas, schedule_buffers

TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")
# Sampling starts from x_T ~ N(0, I); a schedule whose alphas_cumprod[-1] is above this leaves
# more than 10% of x_0 in x_T (sqrt(0.01)), which the sampler never sees: DDPM warns.
MAX_FINAL_ALPHA_BAR = 0.01

_WARNED: set = set()  # keys of the warnings warn_once has given in this process


def _internal_dirs() -> tuple[str, ...]:
    from ddpm_fast import kernels

    here = os.path.dirname(os.path.abspath(__file__))
    return here + os.sep, os.path.dirname(os.path.abspath(kernels.__file__)) + os.sep, \
        os.path.dirname(os.path.abspath(torch.__file__)) + os.sep  # fmt: skip


def warn_once(key, message: str, category: type[Warning] = RuntimeWarning) -> None:
    """warnings.warn(message) the first time `key` is seen in this process, attributed to the
    first frame outside ddpm_fast, its kernels and torch (the user's line), so that the warnings
    module filters it by the user's module and PYTHONWARNINGS / -W silence it."""
    if key in _WARNED:
        return
    _WARNED.add(key)
    internal = _internal_dirs()
    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(internal):
        frame, level = frame.f_back, level + 1  # (no outside frame, as under `ddpm-fast`: the outermost)
    warnings.warn(message, category, stacklevel=level)


def ddim_timesteps(num_timesteps: int, steps: int, spacing: str = "leading") -> list[tuple[int, int]]:
    """(t, t_prev) for each DDIM step, as diffusers' DDIMScheduler spaces them (set_timesteps)
    and steps them (prev = t - T // steps, below 0 meaning the last step, abar_prev = 1):
    "leading" (its default) t = k * (T // steps); "linspace" t = round(linspace(0, T - 1, steps));
    "trailing" t = round(arange(T, 0, -T / steps)) - 1."""
    if spacing == "linspace":
        ts = np.linspace(0, num_timesteps - 1, steps).round()[::-1].astype(np.int64)
    elif spacing == "leading":
        ts = (np.arange(0, steps) * (num_timesteps // steps)).round()[::-1].astype(np.int64)
    elif spacing == "trailing":
        ts = np.round(np.arange(num_timesteps, 0, -num_timesteps / steps)).astype(np.int64) - 1
    else:
        raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}")
    stride = num_timesteps // steps
    return [(int(t), max(int(t) - stride, -1)) for t in ts]


def _warn_if_short(alphas_cumprod: torch.Tensor, beta_schedule: str, timesteps: int) -> None:
    """Warn (once per schedule) when x_T keeps visible signal: the linear schedule's betas run from
    1e-4 to 0.02 whatever T is, so below about T = 460 alphas_cumprod[-1] stays above 0.01 (0.36 at
    T = 100: x_T = 0.60 x_0 + 0.80 eps) while sampling starts from pure noise."""
    final = float(alphas_cumprod[-1])
    if final > MAX_FINAL_ALPHA_BAR:
        warn_once(
            ("short schedule", beta_schedule, timesteps),
            f"DDPM(timesteps={timesteps}, beta_schedule={beta_schedule!r}): alphas_cumprod[-1] = {final:.3g} > "
            f"{MAX_FINAL_ALPHA_BAR}, so x_T still holds {final**0.5:.2f} x_0 while sampling starts from pure noise: "
            "samples come out wrong. Use beta_schedule='cosine' (any T), or the linear schedule with timesteps >= 460",
            UserWarning,
        )


class DDPM(nn.Module):
    def __init__(
        self,
        model: nn.Module,
        image_size: int,
        channels: int = 3,
        timesteps: int = 1000,
        beta_schedule: str = "linear",
        prediction_type: str = "epsilon",
        variance_type: str = "fixed_small",
        fused: bool = False,
        *,
        beta_start: float = BETA_START,
        beta_end: float = BETA_END,
        trained_betas=None,
        snr_gamma: float | None = None,
    ):
        """beta_schedule, beta_start, beta_end and trained_betas have diffusers' names and
        meanings (schedule.make_betas); snr_gamma weighs the loss by min-SNR-gamma (see loss)."""
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        checks.check_prediction_type(prediction_type)
        from ddpm_fast.unet import UNetConfig

        config = getattr(model, "config", None)
        if isinstance(config, UNetConfig):  # our U-Net: check it fits; any other model(x, t) is taken as it is
            factor = 2 ** (len(config.ch_mult) - 1)
            if image_size % factor:
                raise ValueError(f"image_size {image_size} must be divisible by {factor}, the U-Net's downsampling")
            if config.in_channels != channels:
                raise ValueError(f"channels is {channels} but the model takes {config.in_channels} input channels")
            outputs = 2 * channels if variance_type == "learned_range" else channels
            if (config.out_channels or config.in_channels) != outputs:
                why = " (learned_range: the prediction, then the variance)" if variance_type == "learned_range" else ""
                raise ValueError(f"variance_type {variance_type!r} needs a model with {outputs} output channels{why}, "
                                 f"got out_channels={config.out_channels or config.in_channels}")  # fmt: skip

        self.model = model
        self.image_size, self.channels, self.num_timesteps = image_size, channels, timesteps
        self.beta_schedule, self.prediction_type, self.variance_type = beta_schedule, prediction_type, variance_type
        betas = make_betas(beta_schedule, timesteps, beta_start, beta_end, trained_betas)
        self.beta_start, self.beta_end = float(beta_start), float(beta_end)
        self.trained_betas = None if trained_betas is None else betas.tolist()
        if snr_gamma is not None and (isinstance(snr_gamma, bool) or not isinstance(snr_gamma, (int, float))
                                      or not 0.0 < snr_gamma < float("inf")):  # fmt: skip
            raise ValueError(f"snr_gamma must be a positive number or None, got {snr_gamma!r}")
        self.snr_gamma = None if snr_gamma is None else float(snr_gamma)
        for name, value in schedule_buffers(betas, variance_type).items():
            self.register_buffer(name, value, persistent=name not in NOT_IN_STATE_DICT)
        _warn_if_short(self.alphas_cumprod, beta_schedule, timesteps)
        self._graphs = graphs.GraphCache()
        self.set_fused(fused)

    # -- the switch -------------------------------------------------------------------

    def set_fused(self, fused: bool = True) -> "DDPM":
        """Run the diffusion ops (and the U-Net's, if it has the switch) fused or eager."""
        self.fused = bool(fused)
        if hasattr(self.model, "set_fused"):
            self.model.set_fused(fused)
        self._graphs.clear()
        return self

    def _ops(self, device: torch.device):
        """The module whose ops run on `device`: ddpm_fast.kernels when fused, else the eager
        twins. A fused model that will run eager there (a CPU without Triton's interpreter,
        or DDPM_FAST_KERNELS=eager) says so once."""
        if not self.fused:
            return reference
        from ddpm_fast import kernels

        if not torch.compiler.is_compiling() and not kernels.use_triton(device):
            warn_once(
                ("eager fallback", torch.device(device).type, kernels.get_kernel_mode()),
                f"{type(self).__name__}: the fused kernels do not run on {device} here ({kernels.path_setting()}); "
                "running the eager PyTorch path, same results",
            )
        return kernels

    def kernel_path(self, device: torch.device | str | None = None) -> str:
        """ "fused" if the Triton kernels run on `device` (default: where the buffers are), else
        "eager" (a fused model that falls back says so once, here)."""
        device = torch.device(device) if device is not None else self.betas.device
        if not self.fused:
            return "eager"
        from ddpm_fast import kernels

        self._ops(device)
        return "fused" if kernels.use_triton(device) else "eager"

    def _model(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model's prediction, x given in the model's dtype (a float16 / bfloat16 model gets
        its own dtype; the sampler's and the loss's arithmetic stays float32); a model that
        returns an object with `.sample` (diffusers' UNet2DModel) is unwrapped."""
        dtype = self._model_dtype()
        out = self.model(x if dtype is None or x.dtype == dtype else x.to(dtype), t)
        return out if isinstance(out, torch.Tensor) else out.sample

    # -- training (Algorithm 1) ---------------------------------------------------------

    def _check_images(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Checks x's metadata (no sync) and returns it in the dtype the diffusion arithmetic runs
        in: float32, the dtype of a float32 model (float16 or bfloat16 images are cast up), also
        for a float16 or bfloat16 model, which `_model` hands its own dtype (a sampling chain
        kept in half precision would round x_t at every one of its T steps); autocast still runs
        the convolutions in its own dtype."""
        checks.check_float(name, x, ndim=4)
        expected = (self.channels, self.image_size, self.image_size)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"{name} must have shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)}): pass at least one image")
        return x if x.dtype == torch.float32 else x.float()

    def _model_dtype(self) -> torch.dtype | None:
        for p in self.model.parameters():
            if p.is_floating_point():
                return p.dtype
        return None

    def _apply(self, fn, recurse=True):
        """`.to()`, `.half()`, `.cuda()` ... move the schedule buffers but keep them float32: a
        bfloat16 sqrt_recip_alphas_cumprod (about 156 at t = 999) would be off by up to 0.4%."""
        schedule = {name: buf for name, buf in self._buffers.items() if buf is not None and buf.dtype == torch.float32}
        super()._apply(fn, recurse)
        for name, before in schedule.items():
            after = self._buffers[name]
            if after.dtype != torch.float32:
                self._buffers[name] = before.to(after.device)
        return self

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Sample q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)   (eq. 4). t is checked here
        (one host sync)."""
        checks.check_timesteps("t", t, x0.shape[0], self.num_timesteps, x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        return self._q_sample(x0, t, noise)

    def _q_sample(self, x0, t, noise):
        return self._ops(x0.device).q_sample(x0, t, noise, self.sqrt_alphas_cumprod,
                                             self.sqrt_one_minus_alphas_cumprod, check_t=False)  # fmt: skip

    def loss(
        self,
        x0: torch.Tensor,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        check_t: bool = True,
    ) -> torch.Tensor:
        """The simple objective L_simple (eq. 14): || target - model(x_t, t) ||^2, averaged.

        The target is eps (epsilon), x_0 (sample) or v = sqrt(abar) eps - sqrt(1 - abar) x_0
        (v_prediction). t and noise are drawn (from `generator` if given) unless passed; a t
        that is passed is checked (one host sync; check_t=False checks only its metadata), a
        drawn one needs no check: no host sync.

        variance_type "learned_range" (Nichol & Dhariwal 2021): the model outputs the prediction
        and the variance values, and the loss is L_hybrid = L_simple + 0.001 L_vlb, the variance
        term on the prediction with its gradient stopped (ddpm_fast.vlb, improved-diffusion's).

        With snr_gamma (Hang et al. 2023, "min-SNR-gamma"), each sample's mean squared error is
        weighed by min(SNR_t, gamma) / SNR_t for epsilon, min(SNR_t, gamma) / (SNR_t + 1) for
        v_prediction and min(SNR_t, gamma) for sample, SNR_t = abar_t / (1 - abar_t), and the
        weighted errors averaged: as diffusers' training scripts compute it.
        """
        x0 = self._check_images("x0", x0)
        b = x0.shape[0]
        if t is None:
            t = torch.randint(0, self.num_timesteps, (b,), device=x0.device, generator=generator)
        else:
            checks.check_timesteps("t", t, b, self.num_timesteps, x0.device, values=check_t)
        if noise is None:  # in x0's layout (channels_last stays so); the values of torch.randn for NCHW
            noise = torch.empty_like(x0).normal_(generator=generator)
        elif isinstance(noise, torch.Tensor) and noise.is_floating_point() and noise.dtype != x0.dtype:
            noise = noise.to(x0.dtype)
        with nvtx_range("forward"):
            x_t = self._q_sample(x0, t, noise)
            out, variance = self._split(self._model(x_t, t))
        with nvtx_range("loss"):
            if self.prediction_type == "epsilon":
                target = noise
            elif self.prediction_type == "sample":
                target = x0
            else:
                target = (
                    extract(self.sqrt_alphas_cumprod, t, x0.shape) * noise
                    - extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape) * x0
                )
            if self.snr_gamma is None and variance is None:
                return F.mse_loss(out.float(), target.float())
            per_sample = F.mse_loss(out.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
            if self.snr_gamma is not None:
                per_sample = per_sample * self.snr_weights(t)
            if variance is not None:  # the hybrid loss: lambda L_vlb on a stop-gradient mean (vlb.py)
                from ddpm_fast import vlb

                terms = vlb.vb_term(self, x0, x_t, t, out, variance)
                per_sample = per_sample + terms * (self.num_timesteps * vlb.HYBRID_LAMBDA)
            return per_sample.mean()

    def snr_weights(self, t: torch.Tensor) -> torch.Tensor:
        """The min-SNR-gamma loss weight of each t (float32, shape (B,)); ones without snr_gamma."""
        abar = self.alphas_cumprod.gather(0, t.long())
        if self.snr_gamma is None:
            return torch.ones_like(abar)
        snr = abar / (1.0 - abar)
        weight = snr.clamp(max=self.snr_gamma)
        if self.prediction_type == "epsilon":
            return weight / snr
        if self.prediction_type == "v_prediction":
            return weight / (snr + 1.0)
        return weight

    def forward(self, x0: torch.Tensor, **kwargs) -> torch.Tensor:
        """The training loss, so that DistributedDataParallel(ddpm)(x0) syncs its gradients."""
        return self.loss(x0, **kwargs)

    # -- sampling (Algorithm 2) ---------------------------------------------------------

    @torch.no_grad()
    def p_sample(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        generator: torch.Generator | None = None,
        noise_source: str = "torch",
    ) -> torch.Tensor:
        """One reverse step: x_{t-1} ~ p(x_{t-1} | x_t), t an integer tensor of shape (B,),
        checked here (one host sync). z is `noise`, else drawn from `generator`."""
        x_t = self._check_images("x_t", x_t)
        checks.check_timesteps("t", t, x_t.shape[0], self.num_timesteps, x_t.device)
        checks.check_noise_source(noise_source)
        return self._p_sample(x_t, t, noise, clip_denoised, generator, noise_source)

    @property
    def learned_variance(self) -> bool:
        """The model outputs its reverse-process variance too (variance_type "learned_range")."""
        return self.variance_type == "learned_range"

    def _split(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prediction, variance values or None): a learned-variance model's 2C output channels
        split (views, no copy), as diffusers and improved-diffusion split them."""
        if not self.learned_variance:
            return out, None
        if out.shape[1] != 2 * self.channels:
            raise ValueError(f"variance_type 'learned_range': the model must output {2 * self.channels} channels "
                             f"(prediction, variance), got {out.shape[1]}")  # fmt: skip
        return out[:, : self.channels], out[:, self.channels :]

    def _prediction(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model's prediction alone (DDIM and DPM-Solver++ take no learned variance)."""
        return self._split(self._model(x, t))[0]

    def _p_sample(self, x_t, t, noise, clip_denoised, generator, noise_source="torch"):
        with nvtx_range("sampling step"):
            out, variance = self._split(self._model(x_t, t))
            learned = {} if variance is None else dict(model_variance=variance, max_log_variance=self.log_betas)
            return self._ops(x_t.device).posterior_step(
                x_t,
                out,
                t,
                noise,
                self.sqrt_recip_alphas_cumprod,
                self.sqrt_recipm1_alphas_cumprod,
                self.posterior_mean_coef1,
                self.posterior_mean_coef2,
                self.posterior_log_variance,
                prediction_type=self.prediction_type,
                clip_denoised=clip_denoised,
                generator=generator,
                noise_source=noise_source,
                check_t=False,
                **learned,
            )

    def _memory_format(self) -> torch.memory_format:
        """channels_last when the model's convolutions are (model.to(memory_format=...))."""
        for p in self.model.parameters():
            if p.ndim == 4:
                channels_last = not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
                return torch.channels_last if channels_last else torch.contiguous_format
        return torch.contiguous_format

    def _start(self, n: int, generator, device) -> torch.Tensor:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        device = torch.device(device) if device is not None else self.betas.device
        shape = (n, self.channels, self.image_size, self.image_size)
        x = reference.randn(shape, generator, device)
        return x.contiguous(memory_format=self._memory_format())

    def _loop(self, kind, step, x, steps, generator, progress, graph, options, runner=False):
        """Run step(x, t, t_prev, generator) over the (t, t_prev) pairs: a plain loop, or (graph,
        or runner for testing the same path without a GPU) on the static buffers of a StepRunner,
        captured in a CUDA graph when `graph`. No host sync inside the loop either way."""
        self.kernel_path(x.device)  # any fallback warning now, not inside the progress bar
        bar = tqdm(steps, disable=not progress, desc=kind)
        if not (graph or runner):
            n = x.shape[0]
            for i, j in bar:
                t = torch.full((n,), i, device=x.device, dtype=torch.long)
                t_prev = torch.full((n,), j, device=x.device, dtype=torch.long)
                x = step(x, t, t_prev, generator)
            return x
        from ddpm_fast import kernels
        from ddpm_fast.kernels._common import tf32_matmul

        key = (kind, options, tuple(x.shape), x.stride(), x.dtype, x.device, self.training, self.fused,
               kernels.get_kernel_mode(), tf32_matmul())  # fmt: skip
        if graph:
            run = self._graphs.get(key, lambda: graphs.StepRunner(step, x))
        else:
            run = graphs.StepRunner(step, x)
        run.load(x, generator)
        if graph and run.graph is None:
            run.capture()
        for i, j in bar:
            run.run(i, j)
        return run.finish(generator)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        progress: bool = True,
        clip_denoised: bool = True,
        device: torch.device | str | None = None,
        noise_source: str = "torch",
        cuda_graph: bool | str = "auto",
    ) -> torch.Tensor:
        """Ancestral sampling over all T steps: n images in [-1, 1], shape (n, C, H, W).

        x_T and every step's noise come from `generator` (torch's default when None), in the
        same order on the eager and the fused path: DDPM and FastDDPM give the same images. A
        list of n generators (diffusers' convention) gives image i its own, so that it is the
        same image in any batch (ddpm-fast sample seeds one per image; no CUDA graph then).
        noise_source="philox" draws the step noise inside the fused kernel instead (reproducible
        with itself only). cuda_graph: capture one step in a CUDA graph and replay it (True),
        never (False), or on CUDA at batch <= graphs.AUTO_MAX_BATCH ("auto")."""
        checks.check_noise_source(noise_source)
        x = self._start(n, generator, device)
        steps = [(i, i - 1) for i in reversed(range(self.num_timesteps))]

        def step(x, t, t_prev, gen):
            return self._p_sample(x, t, None, clip_denoised, gen, noise_source)

        graph = graphs.use_graph(cuda_graph, x.device, n, generator)
        return self._loop("sampling", step, x, steps, generator, progress, graph,
                          ("ddpm", bool(clip_denoised), noise_source))  # fmt: skip

    @torch.no_grad()
    def ddim_sample(
        self,
        n: int,
        steps: int = 50,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        progress: bool = True,
        clip_denoised: bool = True,
        device: torch.device | str | None = None,
        timestep_spacing: str = "leading",
        use_clipped_model_output: bool = False,
        noise_source: str = "torch",
        cuda_graph: bool | str = "auto",
    ) -> torch.Tensor:
        """DDIM (Song et al. 2021) in `steps` steps, as diffusers' DDIMScheduler runs it:
        timestep_spacing "leading" (diffusers' default), "linspace" or "trailing" (see
        ddim_timesteps); eps is the model's own unless use_clipped_model_output (then recomputed
        from the clipped x_0); eta = 0 is deterministic, eta = 1 has DDPM's variance. Noise,
        generator and cuda_graph as in `sample`."""
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"steps must be an int in [1, {self.num_timesteps}], got {steps!r}")
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
        checks.check_noise_source(noise_source)
        pairs = ddim_timesteps(self.num_timesteps, steps, timestep_spacing)
        x = self._start(n, generator, device)

        def step(x, t, t_prev, gen):
            with nvtx_range("sampling step"):
                return self._ops(x.device).ddim_step(
                    x,
                    self._prediction(x, t),
                    t,
                    t_prev,
                    None,
                    self.alphas_cumprod,
                    eta=eta,
                    prediction_type=self.prediction_type,
                    clip_denoised=clip_denoised,
                    generator=gen,
                    use_clipped_model_output=use_clipped_model_output,
                    noise_source=noise_source,
                    check_t=False,
                )

        options = ("ddim", float(eta), bool(clip_denoised), bool(use_clipped_model_output), noise_source)
        graph = graphs.use_graph(cuda_graph, x.device, n, generator)
        return self._loop("ddim", step, x, pairs, generator, progress, graph, options)

    @torch.no_grad()
    def dpm_solver_sample(
        self,
        n: int,
        steps: int = 20,
        generator: torch.Generator | None = None,
        progress: bool = True,
        clip_denoised: bool = False,
        device: torch.device | str | None = None,
        cuda_graph: bool | str = "auto",
    ) -> torch.Tensor:
        """DPM-Solver++(2M) (Lu et al. 2022) in `steps` model evaluations: the trajectory of
        diffusers' DPMSolverMultistepScheduler with its defaults (ddpm_fast.dpm_solver), any
        prediction type. Deterministic after x_T (drawn from `generator`): DDPM and FastDDPM
        give the same images. clip_denoised clips each data prediction to [-1, 1] (off, as
        diffusers has no clipping by default). generator and cuda_graph as in `sample`."""
        from ddpm_fast.dpm_solver import dpm_solver_timesteps

        timesteps = dpm_solver_timesteps(self.num_timesteps, steps)
        x = self._start(n, generator, device)
        graph = graphs.use_graph(cuda_graph, x.device, n, generator)
        return self._dpm_solver_run(x, timesteps, clip_denoised, generator, progress, graph)

    def _dpm_solver_run(self, x, timesteps, clip_denoised, generator, progress, graph, runner=False):
        from ddpm_fast.dpm_solver import dpm_solver_coefficients

        coefficients = dpm_solver_coefficients(self.alphas_cumprod, timesteps, self.prediction_type).to(x.device)
        x0_prev = torch.zeros_like(x)  # the previous step's data prediction (not read by the first step)

        def step(x, t, i, gen):  # i: the step's row of the coefficient table, on the device
            with nvtx_range("sampling step"):
                out = self._prediction(x, t)
                x_next, x0 = self._ops(x.device).dpm_solver_step(x, out, x0_prev, i, coefficients, clip_denoised,
                                                                 check_step=False)  # fmt: skip
                x0_prev.copy_(x0)  # in place: a CUDA graph replays on the same buffer
                return x_next

        pairs = [(t, i) for i, t in enumerate(timesteps)]
        # (the graph holds this run's coefficient table: a schedule loaded since captures anew)
        options = ("dpm++", tuple(timesteps), bool(clip_denoised), self.alphas_cumprod._version)
        return self._loop("dpm++", step, x, pairs, generator, progress, graph, options, runner=runner)
