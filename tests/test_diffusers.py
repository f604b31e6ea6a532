"""The same numbers as diffusers: DDIM and DDPM against DDIMScheduler / DDPMScheduler step by
step and over whole runs with the same generator, and the paper's released U-Net (diffusers'
UNet2DModel) mapped onto ours, eager and fused (on the tests' device: compiled kernels on CUDA,
Triton's interpreter on a CPU)."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from helpers import DEVICE, generator

from ddpm_fast import DDPM, FastDDPM, UNet, UNetConfig, interop
from ddpm_fast.diffusion import ddim_timesteps
from ddpm_fast.schedule import make_betas

T = 1000
pytestmark = pytest.mark.on_device  # tensors on the tests' device (conftest.py)


class Stub(torch.nn.Module):
    """A fixed, smooth eps(x, t): the samplers' arithmetic is compared, not a network's."""

    def forward(self, x, t):
        phase = t.float()[:, None, None, None] / T
        return 0.7 * torch.sin(3 * x + phase) + 0.3 * x * torch.cos(5 * phase)


def ddpm_pair(cls=DDPM, **kwargs):
    return cls(Stub(), image_size=6, channels=2, timesteps=T, **kwargs)


def ddim_scheduler(ddpm, spacing, **kwargs):
    sched = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing, prediction_type=ddpm.prediction_type,
                          **kwargs)  # fmt: skip
    sched.alphas_cumprod = ddpm.alphas_cumprod.clone()  # the same schedule to the last bit (theirs: float32 cumprod)
    return sched


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("steps", [10, 50, 3])
def test_ddim_timesteps_are_diffusers(spacing, steps):
    sched = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
    sched.set_timesteps(steps)
    pairs = ddim_timesteps(T, steps, spacing)
    assert [t for t, _ in pairs] == sched.timesteps.tolist()
    assert [p for _, p in pairs] == [max(t - T // steps, -1) for t in sched.timesteps.tolist()]


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_ddim_matches_ddim_scheduler_at_every_step_and_over_the_run(spacing, eta, fused, monkeypatch):
    monkeypatch.setenv("DDPM_FAST_KERNELS", "triton" if fused else "eager")
    ddpm = ddpm_pair(FastDDPM if fused else DDPM)
    sched = ddim_scheduler(ddpm, spacing)
    sched.set_timesteps(10)
    ops = ddpm._ops(DEVICE)
    x = torch.randn(3, 2, 6, 6)
    for t, t_prev in ddim_timesteps(T, 10, spacing):  # step by step, from the same x and the same noise
        tt = torch.full((3,), t)
        out = ddpm.model(x, tt)
        z = torch.randn_like(x)
        ours = ops.ddim_step(x, out, tt, torch.full((3,), t_prev), z, ddpm.alphas_cumprod, eta)
        theirs = sched.step(out, t, x, eta=eta, variance_noise=z if eta > 0 else None).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        x = theirs
    # The whole sampler with one generator: x_T and each step's noise drawn in diffusers' order.
    ours = ddpm.ddim_sample(3, steps=10, eta=eta, generator=generator(5), progress=False,
                            timestep_spacing=spacing)  # fmt: skip
    g = generator(5)
    x = torch.randn(3, 2, 6, 6, generator=g)
    for t in sched.timesteps:
        x = sched.step(ddpm.model(x, t.repeat(3).to(DEVICE)), t, x, eta=eta, generator=g).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)  # ten steps of float32 rounding


@pytest.mark.parametrize("use_clipped", [False, True])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_ddim_eps_conventions_match_diffusers(prediction_type, use_clipped):
    ddpm = ddpm_pair(prediction_type=prediction_type)
    sched = ddim_scheduler(ddpm, "leading")
    sched.set_timesteps(20)
    x = torch.randn(2, 2, 6, 6) * 2  # large enough that x_0 is clipped
    for t, t_prev in ddim_timesteps(T, 20, "leading")[:6]:
        tt = torch.full((2,), t)
        out = ddpm.model(x, tt)
        ours = ddpm._ops(x.device).ddim_step(x, out, tt, torch.full((2,), t_prev), None, ddpm.alphas_cumprod,
                                             prediction_type=prediction_type,
                                             use_clipped_model_output=use_clipped)  # fmt: skip
        theirs = sched.step(out, t, x, use_clipped_model_output=use_clipped).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        x = theirs


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_matches_ddpm_scheduler_step_and_run(prediction_type, variance_type, fused, monkeypatch):
    monkeypatch.setenv("DDPM_FAST_KERNELS", "triton" if fused else "eager")
    ddpm = ddpm_pair(FastDDPM if fused else DDPM, prediction_type=prediction_type, variance_type=variance_type)
    sched = DDPMScheduler(num_train_timesteps=T, variance_type=variance_type, prediction_type=prediction_type)
    # DDPMScheduler derives its coefficients from alphas_cumprod (1 - abar_t, abar_t / abar_{t-1}),
    # which near t = 0 need more digits than float32 keeps (ours come from float64 betas): give it
    # the same schedule in float64, computed from the betas as ours is.
    sched.alphas_cumprod = torch.cumprod(1 - make_betas("linear", T), 0)
    sched.set_timesteps(T)
    x = torch.randn(3, 2, 6, 6) * 1.5
    for t in (999, 500, 37, 1, 0):
        tt = torch.full((3,), t)
        ours = ddpm.p_sample(x, tt, generator=generator(t))
        theirs = sched.step(ddpm.model(x, tt), t, x, generator=generator(t)).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # A whole (short) ancestral run with one generator.
    short = ddpm_pair(FastDDPM if fused else DDPM, prediction_type=prediction_type, variance_type=variance_type)
    short.num_timesteps = 30  # the last 30 steps of the 1000-step chain, as a pipeline started at t = 29 would run
    ours = short.sample(2, generator=generator(3), progress=False)
    g = generator(3)
    x = torch.randn(2, 2, 6, 6, generator=g)
    for t in range(29, -1, -1):
        x = sched.step(short.model(x, torch.full((2,), t)), t, x, generator=g).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


# -- the paper's released model: diffusers' UNet2DModel <-> our UNet ----------------------------------

# google/ddpm-cifar10-32's unet config (Ho et al.'s CIFAR-10 model as diffusers publishes it).
PAPER_CONFIG = {
    "_class_name": "UNet2DModel", "act_fn": "silu", "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 32,
    "time_embedding_type": "positional", "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}  # fmt: skip


def diffusers_unet(config=PAPER_CONFIG, seed=0):
    torch.manual_seed(seed)
    model = UNet2DModel(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    with torch.no_grad():  # diffusers zero-initialises nothing, but make every weight count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.fixture(scope="module")
def paper_unet():
    return diffusers_unet().to(DEVICE)


def test_the_paper_config_is_our_default_unet(paper_unet):
    cfg = interop.unet_config_from_diffusers(paper_unet.config)
    assert cfg == UNetConfig(dropout=0.0, out_channels=3)  # ours: the paper's, dropout 0.1 for training
    assert sum(p.numel() for p in paper_unet.parameters()) == 35_746_307
    back = interop.diffusers_config(cfg)
    assert all(back[k] == v for k, v in PAPER_CONFIG.items()), {
        k: back[k] for k in PAPER_CONFIG if back[k] != PAPER_CONFIG[k]
    }


def test_converted_paper_unet_gives_the_same_eps(paper_unet):
    unet = UNet.from_diffusers(paper_unet).eval()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 871])
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t), paper_unet(x, t).sample, rtol=1e-5, atol=1e-5)
    # and back: our weights as diffusers', loaded strictly into a fresh UNet2DModel
    fresh = diffusers_unet(seed=1)
    fresh.load_state_dict(unet.to_diffusers_state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t).sample, paper_unet(x, t).sample, rtol=0, atol=0)


SMALL = {**PAPER_CONFIG, "block_out_channels": [16, 32], "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
         "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "layers_per_block": 1, "norm_num_groups": 4,
         "sample_size": 8}  # fmt: skip


@pytest.mark.slow
def test_a_diffusers_folder_samples_with_the_fused_kernels(tmp_path, monkeypatch):
    """A pipeline folder (unet/, scheduler/) as save_pretrained writes it, read without diffusers'
    loader; FastDDPM (kernels under the interpreter) gives the UNet2DModel's own samples."""
    monkeypatch.setenv("DDPM_FAST_KERNELS", "triton")
    model = diffusers_unet(SMALL)
    model.save_pretrained(tmp_path / "unet")
    sched = DDPMScheduler(num_train_timesteps=5, variance_type="fixed_large")
    sched.save_pretrained(tmp_path / "scheduler")
    unet, kwargs = interop.load_diffusers(str(tmp_path))
    assert kwargs == {"image_size": 8, "channels": 3, "timesteps": 5, "beta_schedule": "linear",
                      "prediction_type": "epsilon", "variance_type": "fixed_large", "beta_start": 1e-4,
                      "beta_end": 0.02}  # fmt: skip
    fast = FastDDPM(unet, **kwargs).eval()
    reference = DDPM(model, **kwargs).eval()  # a diffusers model inside DDPM: model(x, t).sample
    ours = fast.sample(2, generator=generator(0), progress=False)
    theirs = reference.sample(2, generator=generator(0), progress=False)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_mismatched_configs_are_refused_by_name(tmp_path):
    with pytest.raises(interop.ConversionError, match="attention_head_dim=8: multi-head"):
        interop.unet_config_from_diffusers({**PAPER_CONFIG, "attention_head_dim": 8})
    with pytest.raises(interop.ConversionError, match="flip_sin_to_cos=True"):
        interop.unet_config_from_diffusers({**PAPER_CONFIG, "flip_sin_to_cos": True})
    with pytest.raises(interop.ConversionError, match="CrossAttnDownBlock2D"):
        interop.unet_config_from_diffusers({**PAPER_CONFIG, "down_block_types": ["CrossAttnDownBlock2D"] * 4})
    with pytest.raises(interop.ConversionError, match="unexpected weight"):
        interop.from_diffusers(SMALL, {**diffusers_unet(SMALL).state_dict(), "extra.weight": torch.zeros(1)})
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(interop.ConversionError, match="UNet2DConditionModel"):
        interop.load_diffusers(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no diffusers folder"):
        interop.load_diffusers(str(tmp_path / "missing"))


def test_any_model_with_a_foreign_config_is_accepted():
    model = diffusers_unet(SMALL)
    ddpm = DDPM(model, image_size=8, channels=3, timesteps=10)  # model.config is diffusers': not checked as ours
    loss = ddpm.loss(torch.randn(2, 3, 8, 8))
    assert loss.ndim == 0 and torch.isfinite(loss)


@pytest.mark.parametrize("schedule, prediction, variance", [("linear", "epsilon", "fixed_small"),
                                                            ("cosine", "v_prediction", "fixed_large"),
                                                            ("cosine", "sample", "fixed_small")])  # fmt: skip
def test_an_exported_pipeline_folder_is_diffusers_own_with_the_runs_schedule(tmp_path, schedule, prediction, variance):
    """save_diffusers_pipeline (what `export --format diffusers` writes) is a DDPMPipeline folder:
    diffusers loads it with the run's noise schedule (its betas are ours to float32), the same
    U-Net, and our loader reads every option back."""
    from diffusers import DDPMPipeline

    torch.manual_seed(0)
    ddpm = DDPM(UNet(interop.unet_config_from_diffusers(SMALL)), image_size=8, timesteps=50, beta_schedule=schedule,
                prediction_type=prediction, variance_type=variance).cpu()  # fmt: skip
    interop.save_diffusers_pipeline(ddpm, str(tmp_path))
    pipe = DDPMPipeline.from_pretrained(str(tmp_path))
    cfg = pipe.scheduler.config
    assert (cfg.num_train_timesteps, cfg.prediction_type, cfg.variance_type) == (50, prediction, variance)
    torch.testing.assert_close(pipe.scheduler.alphas_cumprod.double(), ddpm.alphas_cumprod.double(),
                               rtol=1e-5, atol=1e-7)  # fmt: skip
    x, t = torch.randn(2, 3, 8, 8, device="cpu"), torch.tensor([3, 40], device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t).sample, ddpm.model.eval()(x, t), rtol=1e-5, atol=1e-5)
    _, kwargs = interop.load_diffusers(str(tmp_path))
    assert kwargs == {"image_size": 8, "channels": 3, "timesteps": 50, "beta_schedule": schedule,
                      "prediction_type": prediction, "variance_type": variance, "beta_start": 1e-4,
                      "beta_end": 0.02}  # fmt: skip


# -- ddpm_fast.fuse on diffusers' own models ----------------------------------------------------------

FUSE_CONFIGS = {
    "one head": SMALL,  # attention_head_dim None: one head of the block's width (the paper's)
    "heads of 8": {**SMALL, "attention_head_dim": 8, "norm_num_groups": 8, "norm_eps": 1e-5},
    # one head of 512 at 4x4: the google/ddpm-*-256 checkpoints' 16x16 attention (chunked kernels)
    "one head of 512": {**SMALL, "block_out_channels": [16, 512]},
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", FUSE_CONFIGS)
def test_fuse_runs_a_unet2dmodel_on_the_kernels_forward_and_backward(name, monkeypatch):
    """fuse(UNet2DModel) in place: every ResnetBlock2D and Attention on the kernels (counted, and
    the kernels really called), the class and state_dict keys unchanged, the output and every
    parameter gradient those of the unfused model; unfuse puts diffusers' path back exactly."""
    import copy

    from diffusers.models.attention_processor import Attention, AttnProcessor2_0
    from diffusers.models.resnet import ResnetBlock2D

    import ddpm_fast
    from ddpm_fast import kernels

    monkeypatch.setenv("DDPM_FAST_KERNELS", "triton")
    model = diffusers_unet(FUSE_CONFIGS[name]).train()
    fused = copy.deepcopy(model)
    calls = []
    for op in ("group_norm_silu", "group_norm", "attention"):
        real = getattr(kernels, op)
        monkeypatch.setattr(kernels, op, lambda *a, _op=op, _real=real, **k: calls.append(_op) or _real(*a, **k))
    expected = sum(isinstance(m, (ResnetBlock2D, Attention)) for m in model.modules())
    assert ddpm_fast.fuse(fused) == expected
    assert type(fused) is UNet2DModel and list(fused.state_dict()) == list(model.state_dict())
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])
    torch.manual_seed(1)  # dropout 0: the same either way
    out, ref = fused(x, t).sample, model(x, t).sample
    n_attn = sum(isinstance(m, Attention) for m in model.modules())
    assert calls.count("group_norm_silu") == 2 * (expected - n_attn) and calls.count("attention") == n_attn
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    out.square().mean().backward()
    ref.square().mean().backward()
    for (pname, p), q in zip(fused.named_parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=pname: f"{n}: {m}")
    assert ddpm_fast.unfuse(fused) is fused and ddpm_fast.fuse(fused, False) == 0
    assert all(type(m.processor) is AttnProcessor2_0 for m in fused.modules() if isinstance(m, Attention))
    calls.clear()
    with torch.no_grad():
        assert torch.equal(fused(x, t).sample, model(x, t).sample) and not calls


def test_fuse_covers_every_module_of_the_256_pixel_checkpoints():
    """google/ddpm-celebahq-256, -church-256, -bedroom-256 and -cat-256 share this UNet2DModel
    config: its attention at 16x16 is one head of 512 channels (attention_head_dim None). Every
    ResnetBlock2D and Attention is fused, none left on diffusers' path (no warning). Built on the
    meta device: only the modules' configuration is read."""
    import warnings

    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    import ddpm_fast

    config = {**PAPER_CONFIG, "sample_size": 256, "block_out_channels": [128, 128, 256, 256, 512, 512],
              "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
              "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4}  # fmt: skip
    with torch.device("meta"):
        model = UNet2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    heads = {m.inner_dim // m.heads for m in model.modules() if isinstance(m, Attention)}
    assert heads == {512}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused = ddpm_fast.fuse(model)
    assert fused == sum(isinstance(m, (ResnetBlock2D, Attention)) for m in model.modules()) == 38


def test_fuse_leaves_what_it_does_not_cover_on_diffusers_path_and_says_how_many():
    """resnet_time_scale_shift "scale_shift" (FiLM: the norm before the time embedding) is not a
    fused GroupNorm + add: those blocks stay diffusers', counted in a warning; the attention is fused."""
    from diffusers.models.resnet import ResnetBlock2D

    import ddpm_fast

    model = diffusers_unet({**SMALL, "resnet_time_scale_shift": "scale_shift"})
    n_resnets = sum(isinstance(m, ResnetBlock2D) for m in model.modules())
    with pytest.warns(UserWarning, match=f"fuse: {n_resnets} diffusers module\\(s\\) of UNet2DModel left"):
        assert ddpm_fast.fuse(model) == 4  # the four attentions


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind", ["ddpm", "ddpm_learned_range", "ddim", "ddpm_strided", "ddpm_strided_fixed_small", "ddpm_strided_learned"]
)
def test_fuse_a_pipeline_gives_its_images_with_the_fused_step(kind, monkeypatch):
    """fuse(DDPMPipeline / DDIMPipeline): the unet fused and the scheduler's step on the fused
    reverse-step kernel (it really runs), the pipeline's images those of the unfused pipeline for
    the same generator (cosine betas, v-prediction, fixed_large, fixed_small or a learned range
    (a 6-channel unet), clipping; DDPM over every timestep or strided, 3 of 10; DDIM with eta > 0
    draws its noise as diffusers does); unfuse puts diffusers' step back."""
    from diffusers import DDIMPipeline, DDPMPipeline

    from ddpm_fast import fuse, kernels, unfuse

    monkeypatch.setenv("DDPM_FAST_KERNELS", "triton")
    learned = kind.endswith(("learned_range", "learned"))
    unet = diffusers_unet({**SMALL, "out_channels": 6} if learned else SMALL).cpu()
    strided = "strided" in kind
    options = dict(num_train_timesteps=10 if strided else 4, beta_schedule="squaredcos_cap_v2",
                   prediction_type="v_prediction", clip_sample=True)  # fmt: skip
    if kind.startswith("ddpm"):
        variance = "learned_range" if learned else "fixed_small" if kind.endswith("fixed_small") else "fixed_large"
        pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(variance_type=variance, **options))
        run = dict(num_inference_steps=3 if strided else 4)
    else:
        pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(**options))
        run = dict(num_inference_steps=2, eta=0.5)
    pipe.set_progress_bar_config(disable=True)

    def images():
        return pipe(batch_size=2, generator=torch.Generator("cpu").manual_seed(0), output_type="np", **run).images

    expected = images()
    steps = []
    op = "posterior_step" if kind.startswith("ddpm") else "ddim_step"
    real = getattr(kernels, op)
    monkeypatch.setattr(kernels, op, lambda *a, **k: steps.append(1) or real(*a, **k))
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    blocks = sum(isinstance(m, (ResnetBlock2D, Attention)) for m in unet.modules())
    assert fuse(pipe) == blocks + 1  # and the scheduler's step
    fused = images()
    assert len(steps) == run["num_inference_steps"]
    np.testing.assert_allclose(fused, expected, rtol=0, atol=2e-4)
    unfuse(pipe)
    assert "step" not in vars(pipe.scheduler)
    np.testing.assert_array_equal(images(), expected)


def test_a_failed_export_leaves_no_temporary_file(tmp_path, monkeypatch):
    """Each file of an exported folder is written to a temporary name and renamed
    (runs.write_atomically, as checkpoints are): a write that fails, a full disk say, removes its
    temporary file instead of leaving it beside the folder's good files."""
    import safetensors.torch

    ddpm = DDPM(UNet(interop.unet_config_from_diffusers(SMALL)), image_size=8, timesteps=10).cpu()

    def full_disk(weights, path, *args, **kwargs):
        open(path, "wb").write(b"half")  # noqa: SIM115
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        interop.save_diffusers_pipeline(ddpm, str(tmp_path))
    assert not list(tmp_path.rglob("*.tmp.*")) and (tmp_path / "unet" / "config.json").is_file()
