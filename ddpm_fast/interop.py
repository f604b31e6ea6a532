"""diffusers interop: the paper's released CIFAR-10 model in, our weights out.

Ho et al.'s CIFAR-10 checkpoint is published in diffusers' format (google/ddpm-cifar10-32: a
UNet2DModel and a DDPMScheduler). Our U-Net is that model layer for layer, so its weights map
one to one:

    unet = UNet.from_diffusers(unet2d)                 # a UNet2DModel, or (config, state_dict)
    unet, ddpm_kwargs = load_diffusers("ddpm-cifar10-32")   # a saved folder, no diffusers needed
    ddpm = FastDDPM(unet, **ddpm_kwargs)               # samples with the fused kernels
    sd = to_diffusers_state_dict(unet)                 # the reverse, with diffusers_config(unet.config)
    save_diffusers_pipeline(ddpm, "folder")            # a DDPMPipeline folder: the U-Net and its schedule

A folder is a model folder (config.json and diffusion_pytorch_model.safetensors or .bin) or a
pipeline folder (unet/ and scheduler/ inside); scheduler_config.json, where present, sets the
number of timesteps, the beta schedule, the variance and the prediction type. A configuration
our U-Net cannot express (multi-head attention, Fourier time embeddings, other blocks ...) is
refused with a message naming the setting.
"""

import json
import os

import torch

from ddpm_fast import runs
from ddpm_fast.schedule import BETA_END, BETA_START
from ddpm_fast.unet import UNet, UNetConfig

# Settings of a UNet2DModel that our U-Net has only in the paper's form: name -> the value it must have.
_FIXED = {
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "time_embedding_dim": None,
    "mid_block_type": "UNetMidBlock2D",
    "downsample_type": "conv",
    "upsample_type": "conv",
    "attn_norm_num_groups": None,
    "downsample_padding": 0,
}


class ConversionError(ValueError):
    """A diffusers model or folder that does not map onto our U-Net."""


def unet_config_from_diffusers(config: dict) -> UNetConfig:
    """Our UNetConfig for a UNet2DModel config (a dict or diffusers' FrozenDict)."""
    config = dict(config)
    for name, value in _FIXED.items():
        if name in config and config[name] != value:
            raise ConversionError(
                f"the diffusers config has {name}={config[name]!r}; ddpm-fast's U-Net needs {value!r}"
            )
    channels = list(config.get("block_out_channels", ()))
    down = list(config.get("down_block_types", ()))
    up = list(config.get("up_block_types", ()))
    if not channels or len(down) != len(channels) or len(up) != len(channels):
        raise ConversionError("block_out_channels, down_block_types and up_block_types must have one entry per level")
    ch = channels[0]
    if any(c % ch for c in channels):
        raise ConversionError(f"block_out_channels {channels} must be multiples of the first, {ch}")
    size = config.get("sample_size", 32)
    size = size[0] if isinstance(size, (list, tuple)) else size
    attn = []
    for level, (d, u) in enumerate(zip(down, reversed(up))):
        if d not in ("DownBlock2D", "AttnDownBlock2D") or u not in ("UpBlock2D", "AttnUpBlock2D"):
            raise ConversionError(f"level {level}: blocks {d!r} / {u!r}; ddpm-fast's U-Net has (Attn)Down/UpBlock2D")
        if (d == "AttnDownBlock2D") != (u == "AttnUpBlock2D"):
            raise ConversionError(f"level {level}: attention going down ({d}) but not coming up ({u}), or the reverse")
        if d == "AttnDownBlock2D":
            attn.append(size // 2**level)
    head_dim = config.get("attention_head_dim")
    for level, c in enumerate(channels):
        if head_dim is not None and head_dim != c and (down[level] == "AttnDownBlock2D" or level == len(channels) - 1):
            raise ConversionError(
                f"attention_head_dim={head_dim}: multi-head attention; ddpm-fast's U-Net has one head"
            )
    return UNetConfig(
        in_channels=config.get("in_channels", 3),
        out_channels=config.get("out_channels", 3),
        image_size=size,
        ch=ch,
        ch_mult=tuple(c // ch for c in channels),
        num_res_blocks=config.get("layers_per_block", 2),
        attn_resolutions=tuple(attn),
        dropout=config.get("dropout", 0.0),
        num_groups=config.get("norm_num_groups", 32),
        norm_eps=config.get("norm_eps", 1e-5),
        resamp_with_conv=True,
    )


def diffusers_config(cfg: UNetConfig) -> dict:
    """The UNet2DModel config of our U-Net (the reverse of unet_config_from_diffusers)."""
    levels = len(cfg.ch_mult)
    attn = [cfg.image_size // 2**level in cfg.attn_resolutions for level in range(levels)]
    return {
        "_class_name": "UNet2DModel",
        **_FIXED,
        "sample_size": cfg.image_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels or cfg.in_channels,
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "layers_per_block": cfg.num_res_blocks,
        "attention_head_dim": None,
        "norm_num_groups": cfg.num_groups,
        "norm_eps": cfg.norm_eps,
        "dropout": cfg.dropout,
    }


def _key_map(cfg: UNetConfig) -> dict[str, str]:
    """Our state_dict key prefix -> diffusers' (without the .weight / .bias suffix)."""
    out = {"temb.0": "time_embedding.linear_1", "temb.2": "time_embedding.linear_2", "conv_in": "conv_in",
           "norm_out": "conv_norm_out", "conv_out": "conv_out"}  # fmt: skip
    levels = len(cfg.ch_mult)

    def resnet(ours, theirs):
        for a, b in (("norm1", "norm1"), ("conv1", "conv1"), ("temb_proj", "time_emb_proj"), ("norm2", "norm2"),
                     ("conv2", "conv2"), ("nin_shortcut", "conv_shortcut")):  # fmt: skip
            out[f"{ours}.{a}"] = f"{theirs}.{b}"

    def attention(ours, theirs):
        for a, b in (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
            out[f"{ours}.{a}"] = f"{theirs}.{b}"

    for level in range(levels):
        for i in range(cfg.num_res_blocks):
            resnet(f"down.{level}.block.{i}", f"down_blocks.{level}.resnets.{i}")
            attention(f"down.{level}.attn.{i}", f"down_blocks.{level}.attentions.{i}")
        out[f"down.{level}.downsample.conv"] = f"down_blocks.{level}.downsamplers.0.conv"
        j = levels - 1 - level  # diffusers numbers the up path from the bottom
        for i in range(cfg.num_res_blocks + 1):
            resnet(f"up.{level}.block.{i}", f"up_blocks.{j}.resnets.{i}")
            attention(f"up.{level}.attn.{i}", f"up_blocks.{j}.attentions.{i}")
        out[f"up.{level}.upsample.conv"] = f"up_blocks.{j}.upsamplers.0.conv"
    resnet("mid.block_1", "mid_block.resnets.0")
    attention("mid.attn_1", "mid_block.attentions.0")
    resnet("mid.block_2", "mid_block.resnets.1")
    return out


def _convert(state: dict, mapping: dict[str, str], shapes: dict[str, torch.Size]) -> dict:
    out = {}
    for key, value in state.items():
        prefix, _, suffix = key.rpartition(".")
        if prefix not in mapping:
            raise ConversionError(f"unexpected weight {key!r}: the model does not match the configuration")
        target = f"{mapping[prefix]}.{suffix}"
        if target not in shapes:
            raise ConversionError(f"unexpected weight {key!r}: the model does not match the configuration")
        value = value.reshape(shapes[target])  # attention projections: Linear (C, C) <-> 1x1 conv (C, C, 1, 1)
        out[target] = value
    missing = set(shapes) - set(out)
    if missing:
        raise ConversionError(f"{len(missing)} weight(s) missing, e.g. {sorted(missing)[0]!r}")
    return out


def state_dict_from_diffusers(state: dict, cfg: UNetConfig) -> dict:
    """A UNet2DModel state_dict as our UNet's (cfg from unet_config_from_diffusers)."""
    ours = UNet(cfg).state_dict()
    inverse = {theirs: mine for mine, theirs in _key_map(cfg).items()}
    return _convert(state, inverse, {k: v.shape for k, v in ours.items()})


def to_diffusers_state_dict(unet: UNet) -> dict:
    """Our UNet's weights as a UNet2DModel state_dict (config: diffusers_config(unet.config))."""
    cfg = unet.config
    shapes = {}
    for mine, theirs in _key_map(cfg).items():
        for suffix in ("weight", "bias"):
            key = f"{mine}.{suffix}"
            value = unet.state_dict().get(key)
            if value is not None:
                linear = theirs.split(".")[-1] in ("to_q", "to_k", "to_v") or theirs.endswith("to_out.0")
                shapes[f"{theirs}.{suffix}"] = value.shape[:2] if linear and suffix == "weight" else value.shape
    return _convert({k: v.detach() for k, v in unet.state_dict().items()}, _key_map(cfg), shapes)


def from_diffusers(model_or_config, state_dict: dict | None = None) -> UNet:
    """Our UNet with the weights of a diffusers UNet2DModel (or of its config and state_dict)."""
    if state_dict is None:
        if not hasattr(model_or_config, "config") or not hasattr(model_or_config, "state_dict"):
            raise TypeError("pass a diffusers UNet2DModel, or its config (a dict) and state_dict")
        config, state_dict = model_or_config.config, model_or_config.state_dict()
    else:
        config = model_or_config
    cfg = unet_config_from_diffusers(config)
    unet = UNet(cfg)
    unet.load_state_dict(state_dict_from_diffusers(state_dict, cfg))
    return unet


# -- folders ----------------------------------------------------------------------------------------

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def _read_weights(folder: str) -> dict:
    for name in WEIGHT_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(path)
            return torch.load(path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no weights in {folder!r}: expected one of {', '.join(WEIGHT_FILES)}")


def _scheduler_kwargs(path: str | None) -> dict:
    """DDPM's arguments from a DDPMScheduler / DDIMScheduler config (the paper's when absent)."""
    if path is None:
        return {}
    with open(path) as f:
        sched = json.load(f)
    name = sched.get("beta_schedule", "linear")
    schedule = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}.get(name)
    trained = sched.get("trained_betas")
    if schedule is None and trained is None:
        raise ConversionError(f"beta_schedule {name!r}: only linear, scaled_linear, squaredcos_cap_v2 or trained_betas")
    variance = sched.get("variance_type", "fixed_small")
    if variance not in ("fixed_small", "fixed_large", "learned_range"):
        raise ConversionError(f"variance_type {variance!r}: only fixed_small, fixed_large or learned_range")
    kwargs = {"timesteps": sched.get("num_train_timesteps", 1000), "beta_schedule": schedule or "linear",
              "prediction_type": sched.get("prediction_type", "epsilon"), "variance_type": variance,
              "beta_start": sched.get("beta_start", BETA_START),
              "beta_end": sched.get("beta_end", BETA_END)}  # fmt: skip
    if trained is not None:
        kwargs["trained_betas"] = trained
    return kwargs


def load_diffusers(path: str) -> tuple[UNet, dict]:
    """(unet, ddpm_kwargs) from a diffusers folder: a model folder (config.json + weights) or a
    pipeline folder (unet/ and scheduler/). ddpm_kwargs: image_size, channels and the scheduler's
    settings, ready for DDPM(unet, **ddpm_kwargs)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no diffusers folder at {path!r}")
    model_dir = os.path.join(path, "unet") if os.path.isdir(os.path.join(path, "unet")) else path
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no config.json in {model_dir!r}: not a diffusers model folder")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ConversionError(f"{config_path} describes a {config['_class_name']}; ddpm-fast maps a UNet2DModel")
    sched = next((p for p in (os.path.join(path, "scheduler", "scheduler_config.json"),
                              os.path.join(path, "scheduler_config.json")) if os.path.isfile(p)), None)  # fmt: skip
    unet = from_diffusers(config, _read_weights(model_dir))
    cfg = unet.config
    return unet, {"image_size": cfg.image_size, "channels": cfg.in_channels, **_scheduler_kwargs(sched)}


_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}  # ours -> diffusers'


def scheduler_config(ddpm) -> dict:
    """The DDPMScheduler config of a DDPM's noise schedule, as diffusers' pipelines read it (and
    _scheduler_kwargs reads back): timesteps, betas (schedule, start, end, or trained), variance,
    prediction type."""
    if ddpm.beta_schedule not in _SCHEDULES:
        raise ConversionError(f"beta_schedule {ddpm.beta_schedule!r} has no diffusers equivalent")
    return {"_class_name": "DDPMScheduler", "_diffusers_version": _diffusers_version(),
            "num_train_timesteps": ddpm.num_timesteps, "beta_schedule": _SCHEDULES[ddpm.beta_schedule],
            "beta_start": ddpm.beta_start, "beta_end": ddpm.beta_end, "trained_betas": ddpm.trained_betas,
            "variance_type": ddpm.variance_type, "prediction_type": ddpm.prediction_type, "clip_sample": True,
            "clip_sample_range": 1.0}  # fmt: skip


def _diffusers_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("diffusers")
    except metadata.PackageNotFoundError:
        return "0.31.0"  # a release whose loaders read these files


def save_diffusers_pipeline(ddpm, path: str) -> None:
    """Write a DDPM (our UNet and its noise schedule) as a diffusers DDPMPipeline folder:
    model_index.json, unet/ (save_diffusers) and scheduler/scheduler_config.json. diffusers'
    `DDPMPipeline.from_pretrained(path)` and our `load_diffusers(path)` read it back with the
    schedule it was trained with. Each file is written to a temporary name and renamed."""
    os.makedirs(path, exist_ok=True)
    index = {"_class_name": "DDPMPipeline", "_diffusers_version": _diffusers_version(),
             "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}  # fmt: skip
    save_diffusers(ddpm.model, os.path.join(path, "unet"))
    os.makedirs(os.path.join(path, "scheduler"), exist_ok=True)
    _write_json(os.path.join(path, "scheduler", "scheduler_config.json"), scheduler_config(ddpm))
    _write_json(os.path.join(path, "model_index.json"), index)


def _write_json(path: str, value: dict) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(value, f, indent=2)

    runs.write_atomically(path, write)


def save_diffusers(unet: UNet, path: str) -> None:
    """Write our UNet as a diffusers model folder: config.json and diffusion_pytorch_model.safetensors."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    _write_json(os.path.join(path, "config.json"), diffusers_config(unet.config))
    weights = {k: v.contiguous() for k, v in to_diffusers_state_dict(unet).items()}
    runs.write_atomically(os.path.join(path, WEIGHT_FILES[0]), lambda tmp: save_file(weights, tmp))
