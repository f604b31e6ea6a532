"""The U-Net of Ho et al. (2020) with self-attention, in PyTorch.

The default configuration is the paper's CIFAR-10 model: ch 128, ch_mult (1, 2, 2, 2),
2 residual blocks per level, self-attention at 16x16, dropout 0.1, a sinusoidal
timestep embedding: 35,746,307 parameters. Module names and the parameter layout
follow the paper's code, so its checkpoints map one to one.

GroupNorm+SiLU pairs and attention call the ops of ddpm_fast.reference (eager) or
ddpm_fast.kernels (fused), chosen by one flag, `UNet.set_fused`; the parameters are
the same either way, so one checkpoint serves both.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ddpm_fast import reference


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 3
    out_channels: int | None = None  # defaults to in_channels
    image_size: int = 32
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    num_groups: int = 32
    norm_eps: float = 1e-6  # the paper's code: tf.contrib.layers.group_norm's epsilon
    resamp_with_conv: bool = True


# Named configurations: the paper's CIFAR-10 model, and small ones that train on a CPU.
PRESETS = {
    "cifar10": UNetConfig(),
    "small": UNetConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), num_groups=8),
    # `ddpm-fast demo`: 16x16 digits in a few minutes on a CPU
    "demo": UNetConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), num_groups=8, dropout=0.0),
}


def _ops(fused: bool):
    if fused:
        from ddpm_fast import kernels

        return kernels
    return reference


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (Vaswani et al., as in Ho et al.): (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class ConcatCache:
    """torch.cat(tensors) of parameters, kept while none of them changes: a cat in eval costs a
    launch per call for nothing. Recomputed whenever a gradient may flow (training), under
    torch.compile (it sees the cat), during CUDA-graph capture (the graph then recomputes it at
    every replay, so weights updated in place between replays are read fresh), and after any
    in-place change (version), move or cast (storage, dtype, device) of any of them."""

    def __init__(self):
        self.key, self.value = None, None

    def __call__(self, tensors) -> torch.Tensor:
        if (
            (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
            or torch.compiler.is_compiling()
            or (tensors[0].is_cuda and torch.cuda.is_current_stream_capturing())
        ):
            return torch.cat(tensors)
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device, t.shape) for t in tensors)
        if key != self.key:
            self.key, self.value = key, torch.cat(tensors)
        return self.value

    def __deepcopy__(self, memo):  # an EMA copy computes its own
        return ConcatCache()

    def __getstate__(self):  # nothing cached travels with a pickled module
        return {"key": None, "value": None}


class GroupNormSiLU(nn.Module):
    """silu(GroupNorm(x [+ add])) with torch.nn.GroupNorm's arguments and state_dict."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups})")
        self.num_groups, self.num_channels, self.eps, self.affine = num_groups, num_channels, eps, affine
        self.weight = nn.Parameter(torch.ones(num_channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_channels)) if affine else None
        self.fused = False

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        return _ops(self.fused).group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps, add=add)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, fused={self.fused}"


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float, num_groups: int, eps: float = 1e-6):
        super().__init__()
        self.norm1 = GroupNormSiLU(num_groups, in_ch, eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = GroupNormSiLU(num_groups, out_ch, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor, temb_add: torch.Tensor | None = None) -> torch.Tensor:
        """temb_add: this block's temb_proj(silu(temb)) where the caller computed it (the fused
        U-Net does so for every block in one GEMM)."""
        h = self.conv1(self.norm1(x))  # (B, out_ch, H, W)
        # The time embedding is added before norm2: fused into the GroupNorm when fused.
        h = self.norm2(h, add=temb_add if temb_add is not None else self.temb_proj(F.silu(temb)))
        h = self.conv2(self.dropout(h))
        return h + (x if self.nin_shortcut is None else self.nin_shortcut(x))


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions of a feature map, with a residual."""

    def __init__(self, channels: int, num_groups: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.GroupNorm(num_groups, channels, eps=eps)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        self.fused = False
        self._qkv_weight, self._qkv_bias = ConcatCache(), ConcatCache()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return self._fused_forward(x)
        B, C, H, W = x.shape
        h = self.norm(x)

        def tokens(t):  # (B, C, H, W) -> (B, 1, H*W, C)
            return t.reshape(B, 1, C, H * W).transpose(-1, -2)

        out = reference.attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)), scale=C**-0.5)
        out = out.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj_out(out)

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same block, laid out for the kernels: the norm through the GroupNorm kernel (no
        activation), q, k and v from one GEMM of the three weights side by side, token-major
        (head dim contiguous: what the attention kernel reads best), the output projection a GEMM
        over tokens. For a channels_last x no layout copy is made anywhere."""
        from ddpm_fast import kernels

        B, C, H, W = x.shape
        h = kernels.group_norm(x, self.norm.num_groups, self.norm.weight, self.norm.bias, self.norm.eps)
        tokens = h.flatten(2).transpose(1, 2)  # (B, HW, C): a view, contiguous when x is channels_last
        weight = self._qkv_weight((self.q.weight, self.k.weight, self.v.weight)).flatten(1)  # (3C, C)
        bias = self._qkv_bias((self.q.bias, self.k.bias, self.v.bias))
        if B == 1 or tokens.is_contiguous():  # (B HW, C) is a view: one addmm, the bias folded in
            qkv = F.linear(tokens.reshape(B * H * W, C), weight, bias).view(B, H * W, 3 * C)
        else:  # a strided batch of token maps: bmm then the bias
            qkv = F.linear(tokens, weight, bias)
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)  # (B, 1, HW, C) views
        out = kernels.attention(q, k, v, scale=C**-0.5)[:, 0]  # (B, HW, C)
        out = F.linear(out, self.proj_out.weight.flatten(1), self.proj_out.bias)
        # NHWC strides (x's own when channels_last); a view, as unflatten, which torch 2.11's Dynamo cannot
        # trace inside a torch.device context
        return x + out.transpose(1, 2).view(B, C, H, W)


class Downsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return F.avg_pool2d(x, 2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # TF's "SAME" padding for stride 2


class Upsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x if self.conv is None else self.conv(x)


class UNet(nn.Module):
    """eps_theta(x_t, t): (B, C, H, W), (B,) integer timesteps -> (B, out_channels, H, W)."""

    def __init__(self, config: UNetConfig | None = None, **overrides):
        super().__init__()
        cfg = config or UNetConfig()
        if overrides:
            cfg = UNetConfig(**{**cfg.__dict__, **overrides})
        _check_config(cfg)
        self.config = cfg
        ch, mult, groups, eps = cfg.ch, tuple(cfg.ch_mult), cfg.num_groups, cfg.norm_eps
        temb_ch = 4 * ch

        self.temb = nn.Sequential(nn.Linear(ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        # Downsampling: each level keeps its outputs for the skip connections.
        res, block_in = cfg.image_size, ch
        skips = [ch]
        self.down = nn.ModuleList()
        for level, m in enumerate(mult):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                stage.block.append(ResnetBlock(block_in, ch * m, temb_ch, cfg.dropout, groups, eps))
                block_in = ch * m
                if res in cfg.attn_resolutions:
                    stage.attn.append(AttnBlock(block_in, groups, eps))
                skips.append(block_in)
            if level != len(mult) - 1:
                stage.downsample = Downsample(block_in, cfg.resamp_with_conv)
                res //= 2
                skips.append(block_in)
            self.down.append(stage)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, temb_ch, cfg.dropout, groups, eps)
        self.mid.attn_1 = AttnBlock(block_in, groups, eps)
        self.mid.block_2 = ResnetBlock(block_in, block_in, temb_ch, cfg.dropout, groups, eps)

        # Upsampling: num_res_blocks + 1 blocks per level, each eating one skip.
        up = []
        for level, m in reversed(list(enumerate(mult))):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in + skips.pop(), ch * m, temb_ch, cfg.dropout, groups, eps))
                block_in = ch * m
                if res in cfg.attn_resolutions:
                    stage.attn.append(AttnBlock(block_in, groups, eps))
            if level != 0:
                stage.upsample = Upsample(block_in, cfg.resamp_with_conv)
                res *= 2
            up.insert(0, stage)  # stored in level order, as the paper's code does
        self.up = nn.ModuleList(up)

        self.norm_out = GroupNormSiLU(groups, block_in, eps)
        self.conv_out = nn.Conv2d(block_in, cfg.out_channels or cfg.in_channels, 3, padding=1)
        self._init_weights()
        self.fused = False  # the time-embedding projections of all blocks as one GEMM (set_fused)
        self._temb_weight, self._temb_bias = ConcatCache(), ConcatCache()

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.ch_mult) - 1)

    def _init_weights(self) -> None:
        # Ho et al.: variance scaling (fan_avg, uniform) everywhere, biases zero, and zero
        # for the last layer of each residual branch and of the network.
        for mod in self.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(mod.weight)
                nn.init.zeros_(mod.bias)
        for mod in self.modules():
            if isinstance(mod, ResnetBlock):
                nn.init.zeros_(mod.conv2.weight)
            elif isinstance(mod, AttnBlock):
                nn.init.zeros_(mod.proj_out.weight)
        nn.init.zeros_(self.conv_out.weight)

    @classmethod
    def from_diffusers(cls, model_or_config, state_dict: dict | None = None) -> "UNet":
        """Our UNet with a diffusers UNet2DModel's weights (the model, or its config and
        state_dict): Ho et al.'s released CIFAR-10 model (google/ddpm-cifar10-32) maps one to one.
        A configuration this U-Net cannot express is refused with a message naming the setting."""
        from ddpm_fast.interop import from_diffusers

        return from_diffusers(model_or_config, state_dict)

    def to_diffusers_state_dict(self) -> dict:
        """This U-Net's weights as a UNet2DModel state_dict (config: interop.diffusers_config)."""
        from ddpm_fast.interop import to_diffusers_state_dict

        return to_diffusers_state_dict(self)

    def set_fused(self, fused: bool = True) -> "UNet":
        """Route GroupNorm+SiLU and attention through ddpm_fast.kernels (True) or the eager ops."""
        for mod in self.modules():
            if isinstance(mod, (GroupNormSiLU, AttnBlock)):
                mod.fused = bool(fused)
        self.fused = bool(fused)
        return self

    def _res_blocks(self) -> list[ResnetBlock]:
        """Every ResnetBlock, in the order forward runs them."""
        down = [block for stage in self.down for block in stage.block]
        up = [block for stage in reversed(self.up) for block in stage.block]
        return [*down, self.mid.block_1, self.mid.block_2, *up]

    def _temb_adds(self, temb: torch.Tensor) -> dict:
        """{block: its temb_proj(silu(temb))}, from one SiLU and one GEMM over the blocks'
        projections side by side (their weights stay per block in the state_dict; concatenated
        once per call while training, cached in eval): 2 launches instead of 2 per block. Each
        block's slice is a strided (B, C) view, which the fused GroupNorm reads in place."""
        blocks = self._res_blocks()
        weight = self._temb_weight([b.temb_proj.weight for b in blocks])  # (sum C, temb_ch)
        bias = self._temb_bias([b.temb_proj.bias for b in blocks])
        out = F.linear(F.silu(temb), weight, bias)  # (B, sum C)
        return dict(zip(blocks, out.split([b.temb_proj.out_features for b in blocks], dim=1)))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must have shape (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[-2] % self.downsample_factor or x.shape[-1] % self.downsample_factor:
            raise ValueError(
                f"x's height and width {tuple(x.shape[-2:])} must be divisible by {self.downsample_factor}, "
                f"the U-Net's downsampling factor"
            )
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},), one timestep per sample, got {tuple(t.shape)}")

        temb = self.temb(timestep_embedding(t, cfg.ch).to(self.temb[0].weight.dtype))  # (B, 4ch), the model's dtype
        adds = self._temb_adds(temb) if self.fused else {}
        hs = [self.conv_in(x)]
        for stage in self.down:
            for i, block in enumerate(stage.block):
                h = block(hs[-1], temb, adds.get(block))
                if len(stage.attn):
                    h = stage.attn[i](h)
                hs.append(h)
            if hasattr(stage, "downsample"):
                hs.append(stage.downsample(hs[-1]))

        mid = self.mid
        h = mid.block_2(mid.attn_1(mid.block_1(hs[-1], temb, adds.get(mid.block_1))), temb, adds.get(mid.block_2))

        for stage in reversed(self.up):
            for i, block in enumerate(stage.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb, adds.get(block))
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(self.norm_out(h))


def _check_config(cfg: UNetConfig) -> None:
    for name in ("in_channels", "image_size", "ch", "num_groups", "num_res_blocks"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "num_res_blocks" else 1):
            low = "an int >= 0" if name == "num_res_blocks" else "a positive int"
            raise ValueError(f"{name} must be {low}, got {value!r}")
    if cfg.out_channels is not None and (not isinstance(cfg.out_channels, int) or cfg.out_channels < 1):
        raise ValueError(f"out_channels must be a positive int (or None: in_channels), got {cfg.out_channels!r}")
    if not cfg.ch_mult or any(m < 1 for m in cfg.ch_mult):
        raise ValueError(f"ch_mult must be a non-empty tuple of positive ints, got {cfg.ch_mult}")
    if cfg.ch % 2:
        raise ValueError(f"ch must be even (the timestep embedding has ch dims), got {cfg.ch}")
    factor = 2 ** (len(cfg.ch_mult) - 1)
    if cfg.image_size < factor or cfg.image_size % factor:
        raise ValueError(
            f"image_size {cfg.image_size} must be divisible by {factor}, "
            f"the downsampling factor of ch_mult {cfg.ch_mult}"
        )
    for m in (1, *cfg.ch_mult):
        if (cfg.ch * m) % cfg.num_groups:
            raise ValueError(f"num_groups ({cfg.num_groups}) must divide every channel count (ch * ch_mult)")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {cfg.dropout}")
    if not cfg.norm_eps > 0 or not math.isfinite(cfg.norm_eps):
        raise ValueError(f"norm_eps must be positive, got {cfg.norm_eps}")
