"""The fused kernels inside diffusers' own models, in place: `ddpm_fast.fuse(unet2dmodel)`.

diffusers' ResnetBlock2D calls its GroupNorms and SiLU inside `forward`, and its attention goes
through an `Attention` module's processor, so neither shows in the module tree. `fuse` gives
each supported ResnetBlock2D a fused forward of its own (an instance attribute: the class, the
parameters and every state_dict key stay as they are) that runs norm1 + SiLU and norm2 + the
time-embedding add + SiLU through ddpm_fast.kernels.group_norm_silu, and gives each supported
Attention an attention processor of ours (diffusers' own mechanism) that runs its GroupNorm
through kernels.group_norm and softmax(q k^T) v through kernels.attention. Forward and
backward: the kernels are autograd functions, so diffusers' training scripts get them too.
`unfuse` (or `fuse(model, False)`) puts diffusers' forward and processors back.

Supported, and what DDPM checkpoints use (google/ddpm-cifar10-32, -celebahq-256, -church-256,
-bedroom-256, -cat-256): ResnetBlock2D with time_embedding_norm "default" (resnet_time_scale_shift
"default"), SiLU, GroupNorm norms; Attention blocks of any number of heads (attention_head_dim set
or None) with head dims up to 512, self-attention without a mask, whose processor is diffusers'
AttnProcessor2_0 or AttnProcessor. Anything else is left on diffusers' path and counted.
diffusers itself is imported only here, when a diffusers model is passed.
"""

import importlib
import types
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from ddpm_fast import kernels

_SAVED = "_ddpm_fast_unfused_processor"  # the processor an Attention had before fuse


def is_diffusers_model(model: nn.Module) -> bool:
    return any(type(m).__module__.startswith("diffusers.") for m in model.modules())


def fuse_diffusers(model: nn.Module, enabled: bool = True) -> tuple[int, int]:
    """(modules now fused, supported-looking modules left on diffusers' path) of `model`'s
    ResnetBlock2D and Attention modules; with enabled=False, diffusers' path everywhere and (0, 0)."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    fused = left = 0
    for module in model.modules():
        if isinstance(module, ResnetBlock2D):
            if not enabled:
                module.__dict__.pop("forward", None)
            elif _resnet_supported(module):
                module.forward = types.MethodType(_fused_resnet_forward, module)
                fused += 1
            else:
                left += 1
        elif isinstance(module, Attention):
            if not enabled:
                if hasattr(module, _SAVED):
                    module.set_processor(getattr(module, _SAVED))
                    delattr(module, _SAVED)
            elif isinstance(module.processor, FusedAttnProcessor):
                fused += 1
            elif _attention_supported(module):
                setattr(module, _SAVED, module.processor)
                module.set_processor(FusedAttnProcessor())
                fused += 1
            else:
                left += 1
    if left:
        warnings.warn(f"fuse: {left} diffusers module(s) of {type(model).__name__} left on diffusers' path (a "
                      "configuration the fused kernels do not cover: see ddpm_fast.diffusers_fused)",
                      stacklevel=3)  # fmt: skip
    return fused, left


def _resnet_supported(block) -> bool:
    return (block.time_embedding_norm == "default" and type(block.nonlinearity) is nn.SiLU
            and type(block.norm1) is nn.GroupNorm and type(block.norm2) is nn.GroupNorm
            and block.norm1.affine and block.norm2.affine)  # fmt: skip


def _fused_resnet_forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args, **kwargs):
    """diffusers' ResnetBlock2D.forward (time_embedding_norm "default") with its two
    GroupNorm + SiLU pairs fused, the time-embedding add inside the second."""
    if self.time_emb_proj is None and temb is not None:  # a raw temb added to the map: diffusers' own path
        return type(self).forward(self, input_tensor, temb, *args, **kwargs)
    n1, n2 = self.norm1, self.norm2
    hidden_states = kernels.group_norm_silu(input_tensor, n1.num_groups, n1.weight, n1.bias, n1.eps)
    if self.upsample is not None:
        if hidden_states.shape[0] >= 64:
            input_tensor = input_tensor.contiguous()
            hidden_states = hidden_states.contiguous()
        input_tensor = self.upsample(input_tensor)
        hidden_states = self.upsample(hidden_states)
    elif self.downsample is not None:
        input_tensor = self.downsample(input_tensor)
        hidden_states = self.downsample(hidden_states)
    hidden_states = self.conv1(hidden_states)
    add = None
    if self.time_emb_proj is not None and temb is not None:
        add = self.time_emb_proj(temb if self.skip_time_act else F.silu(temb))  # (B, C): added per channel
    hidden_states = kernels.group_norm_silu(hidden_states, n2.num_groups, n2.weight, n2.bias, n2.eps, add=add)
    hidden_states = self.dropout(hidden_states)
    hidden_states = self.conv2(hidden_states)
    if self.conv_shortcut is not None:
        input_tensor = self.conv_shortcut(input_tensor.contiguous() if self.training else input_tensor)
    return (input_tensor + hidden_states) / self.output_scale_factor


def _attention_supported(attn) -> bool:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if type(attn.processor) not in (AttnProcessor, AttnProcessor2_0):
        return False
    if attn.spatial_norm is not None or attn.norm_q is not None or attn.norm_k is not None or attn.is_cross_attention:
        return False
    if attn.group_norm is not None and type(attn.group_norm) is not nn.GroupNorm:
        return False
    head_dim = attn.inner_dim // attn.heads
    # AttnProcessor2_0 scales by head_dim ** -0.5 (SDPA's default), AttnProcessor by attn.scale: fused where they agree
    max_head_dim = importlib.import_module("ddpm_fast.kernels.attention").MAX_HEAD_DIM
    return head_dim <= max_head_dim and abs(attn.scale - head_dim**-0.5) < 1e-12


class FusedAttnProcessor:
    """diffusers' AttnProcessor2_0 for self-attention without a mask, its GroupNorm and
    softmax(q k^T / sqrt(d)) v on ddpm_fast's kernels; anything else (a mask, cross-attention)
    goes to AttnProcessor2_0 itself."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):  # fmt: skip
        if encoder_hidden_states is not None or attention_mask is not None:
            from diffusers.models.attention_processor import AttnProcessor2_0

            return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            if attn.group_norm is not None:  # on the (B, C, H, W) map itself: no transposes
                g = attn.group_norm
                hidden_states = kernels.group_norm(hidden_states, g.num_groups, g.weight, g.bias, g.eps)
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        else:
            batch_size = hidden_states.shape[0]
            if attn.group_norm is not None:
                g = attn.group_norm
                hidden_states = kernels.group_norm(hidden_states.transpose(1, 2), g.num_groups, g.weight, g.bias,
                                                   g.eps).transpose(1, 2)  # fmt: skip
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        # (B, L, heads * d) viewed as (B, heads, L, d): the head dim contiguous, as the kernel reads best
        query, key, value = (t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        hidden_states = kernels.attention(query, key, value, scale=head_dim**-0.5)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


# -- pipelines: the scheduler's step on the fused reverse-step kernels --------------------------------

_BUFFERS = "_ddpm_fast_buffers"  # a fused scheduler's schedule buffers on the device it last ran on


def fuse_pipeline(pipe, enabled: bool = True) -> int:
    """A DDPMPipeline / DDIMPipeline (anything with .unet and .scheduler): its unet fused as
    fuse_diffusers does, and its scheduler's `step` (an instance attribute) on
    kernels.posterior_step / kernels.ddim_step where the scheduler's config is one those compute
    exactly (consecutive or strided timesteps, fixed or learned-range variances); elsewhere, and
    for a DDIM step given both a generator and variance_noise, diffusers' own step runs."""
    from ddpm_fast.fast import fuse

    count = fuse(pipe.unet, enabled)
    scheduler = pipe.scheduler
    if not enabled:
        scheduler.__dict__.pop("step", None)
        scheduler.__dict__.pop(_BUFFERS, None)
        return 0
    step = _fused_step_for(scheduler)
    if step is None:
        warnings.warn(f"fuse: {type(scheduler).__name__} with this config stays on diffusers' step (the fused steps "
                      "cover DDPMScheduler and DDIMScheduler, fixed variances, clip range 1, no thresholding)",
                      stacklevel=3)  # fmt: skip
        return count
    scheduler.step = types.MethodType(step, scheduler)
    return count + 1


def _fused_step_for(scheduler):
    from diffusers import DDIMScheduler, DDPMScheduler

    cfg = scheduler.config
    common = (cfg.prediction_type in ("epsilon", "sample", "v_prediction") and not cfg.thresholding
              and (not cfg.clip_sample or cfg.clip_sample_range == 1.0))  # fmt: skip
    if type(scheduler) is DDPMScheduler and common and cfg.variance_type in ("fixed_small", "fixed_large",
                                                                            "learned_range"):  # fmt: skip
        return _fused_ddpm_step
    if type(scheduler) is DDIMScheduler and common and cfg.set_alpha_to_one:
        return _fused_ddim_step
    return None


def _buffers(scheduler, device, build, spacing=None):
    """build()'s tensors, kept on the scheduler per device and `spacing` (the timesteps tensor a
    strided schedule's buffers were built for: set_timesteps makes a new one)."""
    found = scheduler.__dict__.get(_BUFFERS)
    if found is None or found[0] != device or found[1] is not spacing:
        found = scheduler.__dict__[_BUFFERS] = (device, spacing, build())
    return found[2]


def _strided_buffers(scheduler, device) -> list:
    """The posterior step's buffers (POSTERIOR_STEP_BUFFERS, then log beta) for a schedule whose
    steps skip timesteps (num_inference_steps < num_train_timesteps), indexed by t: each of the
    scheduler's timesteps steps to the next (its previous_timestep, -1 after the last), with the
    beta that spacing implies, as DDPMScheduler.step computes it:
        beta'_t = 1 - abar_t / abar_prev,        var_t = max((1 - abar_prev) / (1 - abar_t) beta'_t, 1e-20)
        coef1 = sqrt(abar_prev) beta'_t / (1 - abar_t)
        coef2 = sqrt(abar_t / abar_prev) (1 - abar_prev) / (1 - abar_t)
    and log var_t (fixed_small; the learned range's lower end) or log beta'_t (fixed_large) as the
    step's log variance. In float64 from the scheduler's own alphas_cumprod, stored float32."""
    abar = scheduler.alphas_cumprod.double().cpu()
    steps = scheduler.timesteps.long().cpu()
    prev = torch.arange(abar.shape[0]) - 1  # timesteps outside the schedule: never read
    prev[steps] = torch.cat([steps[1:], steps.new_full((1,), -1)])
    abar_prev = torch.where(prev >= 0, abar[prev.clamp(min=0)], torch.ones_like(abar))
    beta = 1 - abar / abar_prev
    var = ((1 - abar_prev) / (1 - abar) * beta).clamp(min=1e-20)
    log_var = beta.log() if scheduler.config.variance_type == "fixed_large" else var.log()
    bufs = [1 / abar.sqrt(), (1 / abar - 1).sqrt(), abar_prev.sqrt() * beta / (1 - abar),
            (abar / abar_prev).sqrt() * (1 - abar_prev) / (1 - abar), log_var, beta.log()]  # fmt: skip
    return [b.to(device, torch.float32) for b in bufs]


def _fused_ddpm_step(self, model_output, timestep, sample, generator=None, return_dict=True):
    """DDPMScheduler.step on kernels.posterior_step, fixed or learned-range variances; for
    consecutive timesteps (the pipeline's default: as many inference steps as training steps)
    from the schedule's buffers, for strided ones (num_inference_steps < num_train_timesteps)
    from buffers of the spacing (_strided_buffers)."""
    from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
    from diffusers.utils.torch_utils import randn_tensor

    from ddpm_fast.schedule import POSTERIOR_STEP_BUFFERS, schedule_buffers

    t = int(timestep)
    learned = self.config.variance_type == "learned_range"
    expected = (sample.shape[0], 2 * sample.shape[1], *sample.shape[2:]) if learned else sample.shape
    if model_output.shape != expected:
        return type(self).step(self, model_output, timestep, sample, generator=generator, return_dict=return_dict)

    def build():  # from the scheduler's own betas: any beta_schedule it was given
        b = schedule_buffers(self.betas.double(), self.config.variance_type)
        return [b[name].to(sample.device) for name in (*POSTERIOR_STEP_BUFFERS, "log_betas")]

    if int(self.previous_timestep(t)) == t - 1:
        *bufs, log_betas = _buffers(self, sample.device, build)
    else:
        *bufs, log_betas = _buffers(self, sample.device, lambda: _strided_buffers(self, sample.device), self.timesteps)
    variance = {}
    if learned:  # diffusers' split: the prediction, then the variance values
        model_output, values = model_output.split(sample.shape[1], dim=1)
        variance = dict(model_variance=values, max_log_variance=log_betas)
    # the noise diffusers draws, from the same generator, after the same draws: the same images
    noise = (randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                          dtype=model_output.dtype) if t > 0 else torch.zeros_like(sample))  # fmt: skip
    tt = torch.full((sample.shape[0],), t, device=sample.device, dtype=torch.long)
    prev = kernels.posterior_step(sample, model_output, tt, noise, *bufs, self.config.prediction_type,
                                  bool(self.config.clip_sample), check_t=False, **variance)  # fmt: skip
    return DDPMSchedulerOutput(prev_sample=prev, pred_original_sample=None) if return_dict else (prev, None)


def _fused_ddim_step(self, model_output, timestep, sample, eta=0.0, use_clipped_model_output=False, generator=None,
                     variance_noise=None, return_dict=True):  # fmt: skip
    """DDIMScheduler.step on kernels.ddim_step (set_alpha_to_one: the last step lands on abar = 1)."""
    from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
    from diffusers.utils.torch_utils import randn_tensor

    if self.num_inference_steps is None or (variance_noise is not None and generator is not None):
        return type(self).step(self, model_output, timestep, sample, eta, use_clipped_model_output, generator,
                               variance_noise, return_dict)  # fmt: skip
    t = int(timestep)
    t_prev = t - self.config.num_train_timesteps // self.num_inference_steps
    noise = None
    if eta > 0:
        noise = (
            variance_noise
            if variance_noise is not None
            else randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
            )
        )
    ac = _buffers(self, sample.device, lambda: self.alphas_cumprod.to(sample.device, torch.float32))
    n = sample.shape[0]
    tt = torch.full((n,), t, device=sample.device, dtype=torch.long)
    tp = torch.full((n,), t_prev, device=sample.device, dtype=torch.long)
    prev = kernels.ddim_step(sample, model_output, tt, tp, noise, ac, float(eta), self.config.prediction_type,
                             bool(self.config.clip_sample), None, bool(use_clipped_model_output),
                             check_t=False)  # fmt: skip
    return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=None) if return_dict else (prev, None)
