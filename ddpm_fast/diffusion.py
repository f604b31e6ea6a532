"""DDPM (Ho, Jain & Abbeel, 2020): the forward process, the training loss and the samplers.

Training (Algorithm 1) and sampling (Algorithm 2) are kept apart. The elementwise maths
of q_sample and of one reverse step is done by the ops in ddpm_fast.reference (eager)
or ddpm_fast.kernels (fused), picked by the `fused` flag, which also switches the
U-Net's GroupNorm+SiLU and attention when the model supports it.
"""

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ddpm_fast import checks, reference
from ddpm_fast.profiling import nvtx_range
from ddpm_fast.schedule import extract, make_betas, schedule_buffers


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
    ):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        checks.check_prediction_type(prediction_type)
        config = getattr(model, "config", None)
        if config is not None:
            factor = 2 ** (len(config.ch_mult) - 1)
            if image_size % factor:
                raise ValueError(f"image_size {image_size} must be divisible by {factor}, the U-Net's downsampling")
            if config.in_channels != channels:
                raise ValueError(f"channels is {channels} but the model takes {config.in_channels} input channels")
            if (config.out_channels or config.in_channels) != channels:
                raise ValueError(f"channels is {channels} but the model outputs {config.out_channels} channels")

        self.model = model
        self.image_size, self.channels, self.num_timesteps = image_size, channels, timesteps
        self.beta_schedule, self.prediction_type, self.variance_type = beta_schedule, prediction_type, variance_type
        for name, value in schedule_buffers(make_betas(beta_schedule, timesteps), variance_type).items():
            self.register_buffer(name, value)
        self.set_fused(fused)

    # -- the switch -------------------------------------------------------------------

    def set_fused(self, fused: bool = True) -> "DDPM":
        """Run the diffusion ops (and the U-Net's, if it has the switch) fused or eager."""
        self.fused = bool(fused)
        self._eager_warned = False
        if hasattr(self.model, "set_fused"):
            self.model.set_fused(fused)
        return self

    def _ops(self, device: torch.device):
        """The module whose ops run on `device`: ddpm_fast.kernels when fused, else the eager
        twins. A fused model that will run eager there (a CPU without Triton's interpreter,
        or DDPM_FAST_KERNELS=eager) says so once."""
        if not self.fused:
            return reference
        from ddpm_fast import kernels

        if not self._eager_warned and not kernels.use_triton(device):
            self._eager_warned = True
            warnings.warn(
                f"{type(self).__name__}: the fused kernels do not run on {device} here "
                f"(DDPM_FAST_KERNELS={kernels.get_kernel_mode()}, Triton interpreter "
                f"{'on' if kernels.interpreter_on() else 'off'}); running the eager PyTorch path, same results",
                RuntimeWarning,
                stacklevel=3,
            )
        return kernels

    # -- training (Algorithm 1) ---------------------------------------------------------

    def _check_images(self, name: str, x: torch.Tensor) -> None:
        checks.check_float(name, x, ndim=4)
        expected = (self.channels, self.image_size, self.image_size)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"{name} must have shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Sample q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)   (eq. 4)."""
        if noise is None:
            noise = torch.randn_like(x0)
        return self._ops(x0.device).q_sample(x0, t, noise, self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod)

    def loss(
        self,
        x0: torch.Tensor,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The simple objective L_simple (eq. 14): || target - model(x_t, t) ||^2, averaged.

        The target is eps (epsilon), x_0 (sample) or v = sqrt(abar) eps - sqrt(1 - abar) x_0
        (v_prediction). t and noise are drawn (from `generator` if given) unless passed.
        """
        self._check_images("x0", x0)
        b = x0.shape[0]
        if t is None:
            t = torch.randint(0, self.num_timesteps, (b,), device=x0.device, generator=generator)
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        with nvtx_range("forward"):
            out = self.model(self.q_sample(x0, t, noise), t)
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
            return F.mse_loss(out.float(), target.float())

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
    ) -> torch.Tensor:
        """One reverse step: x_{t-1} ~ p(x_{t-1} | x_t), t an integer tensor of shape (B,)."""
        self._check_images("x_t", x_t)
        checks.check_timesteps("t", t, x_t.shape[0], self.num_timesteps, x_t.device)
        return self._p_sample(x_t, t, noise, clip_denoised, generator)

    def _p_sample(self, x_t, t, noise, clip_denoised, generator):
        with nvtx_range("sampling step"):
            return self._ops(x_t.device).posterior_step(
                x_t,
                self.model(x_t, t),
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
            )

    def _start(self, n: int, generator, device) -> torch.Tensor:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        device = device or self.betas.device
        shape = (n, self.channels, self.image_size, self.image_size)
        return torch.randn(shape, generator=generator, device=device)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        progress: bool = True,
        clip_denoised: bool = True,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Ancestral sampling over all T steps: n images in [-1, 1], shape (n, C, H, W)."""
        x = self._start(n, generator, device)
        for i in tqdm(reversed(range(self.num_timesteps)), total=self.num_timesteps, disable=not progress,
                      desc="sampling"):  # fmt: skip
            t = torch.full((n,), i, device=x.device, dtype=torch.long)
            x = self._p_sample(x, t, None, clip_denoised, generator)
        return x

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
    ) -> torch.Tensor:
        """DDIM (Song et al. 2021) over `steps` timesteps evenly spaced in [0, T); eta = 0 is
        deterministic, eta = 1 matches DDPM's variance."""
        if not isinstance(steps, int) or not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"steps must be an int in [1, {self.num_timesteps}], got {steps!r}")
        x = self._start(n, generator, device)
        seq = torch.linspace(0, self.num_timesteps - 1, steps, dtype=torch.float64).round().long().tolist()
        prev = [-1, *seq[:-1]]
        for i, j in tqdm(list(zip(reversed(seq), reversed(prev))), disable=not progress, desc="ddim"):
            t = torch.full((n,), i, device=x.device, dtype=torch.long)
            t_prev = torch.full((n,), j, device=x.device, dtype=torch.long)
            with nvtx_range("sampling step"):
                x = self._ops(x.device).ddim_step(
                    x,
                    self.model(x, t),
                    t,
                    t_prev,
                    None,
                    self.alphas_cumprod,
                    eta=eta,
                    prediction_type=self.prediction_type,
                    clip_denoised=clip_denoised,
                    generator=generator,
                )
        return x
