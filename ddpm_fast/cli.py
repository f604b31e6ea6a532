"""The `ddpm-fast` command: train, sample, export, demo.

ddpm-fast demo                                    small model, built-in digits, a few minutes on a CPU
ddpm-fast train --dataset cifar10 --class airplane --data-root data --out runs/airplane
torchrun --nproc_per_node 4 -m ddpm_fast.cli train ...   # DistributedDataParallel
ddpm-fast sample --checkpoint runs/airplane/checkpoint.pt --n 64 --out samples.png
ddpm-fast sample --diffusers ddpm-cifar10-32 --n 64 --out samples.png    # the paper's released model
ddpm-fast export --checkpoint runs/airplane/checkpoint.pt --out airplane.safetensors
"""

import argparse
import json
import os
import sys
import time
import warnings
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchvision.utils import save_image

from ddpm_fast import interop, kernels
from ddpm_fast.data import CIFAR10_CLASSES, DATASETS, make_dataset
from ddpm_fast.diffusion import DDPM
from ddpm_fast.fast import FastDDPM
from ddpm_fast.train import CheckpointError, TrainConfig, Trainer, ema_model_state, load_checkpoint
from ddpm_fast.unet import PRESETS, UNet, UNetConfig


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _build(model_config: dict, fused: bool) -> DDPM:
    unet = dict(model_config["unet"])
    unet["ch_mult"], unet["attn_resolutions"] = tuple(unet["ch_mult"]), tuple(unet["attn_resolutions"])
    unet.setdefault("norm_eps", 1e-5)  # checkpoints from before the setting were trained with torch's default
    cfg = UNetConfig(**unet)
    cls = FastDDPM if fused else DDPM
    return cls(UNet(cfg), image_size=cfg.image_size, channels=cfg.in_channels, **model_config["ddpm"])


def _model_config(args, channels: int) -> dict:
    base = PRESETS[args.preset]
    overrides = {"in_channels": channels, "image_size": args.image_size}
    if args.dropout is not None:
        overrides["dropout"] = args.dropout
    unet = UNetConfig(**{**asdict(base), **overrides})
    ddpm = {"timesteps": args.timesteps, "beta_schedule": args.beta_schedule, "prediction_type": args.prediction_type}
    return {"unet": asdict(unet), "ddpm": ddpm}


def _setup_distributed(device_arg: str) -> torch.device:
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device_arg.startswith("cuda") and torch.cuda.is_available()
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
        if use_cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            return torch.device("cuda", local)
    return torch.device(device_arg)


def train(args) -> None:
    device = _setup_distributed(args.device)
    rank = dist.get_rank() if dist.is_initialized() else 0
    try:
        channels = 1 if args.dataset == "digits" else 3
        dataset = make_dataset(args.dataset, args.image_size, args.data_root, args.class_name, args.download, channels)
        config = TrainConfig(
            out_dir=args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
            ema_decay=args.ema_decay, amp=args.amp, sample_every=args.sample_every, num_samples=args.num_samples,
            sample_steps=args.sample_steps, seed=args.seed, max_steps=args.max_steps, num_workers=args.num_workers,
            channels_last=args.channels_last,
        )  # fmt: skip
        model_config = _model_config(args, channels)
        resume_path = os.path.join(args.out, "checkpoint.pt") if args.resume else None
        if resume_path:  # the model comes from the checkpoint
            model_config = load_checkpoint(resume_path)["config"]["model"]
        torch.manual_seed(args.seed)
        ddpm = _build(model_config, args.fused)
        trainer = Trainer(ddpm, dataset, config, device, model_config)
        if resume_path:
            trainer.resume(resume_path)
        if rank == 0:
            n_params = sum(p.numel() for p in ddpm.model.parameters())
            world = dist.get_world_size() if dist.is_initialized() else 1
            path = "fused" if args.fused else "eager"
            print(f"training a {n_params:,}-parameter U-Net on {len(dataset):,} images ({args.dataset}) on {device}"
                  f" x {world}, {path}; from step {trainer.step}; out: {args.out}")  # fmt: skip
        trainer.train()
        if rank == 0:
            print(f"done at step {trainer.step}: {trainer.checkpoint_path}, {trainer.log_path}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _load_for_sampling(path: str, fused: bool, device: torch.device, ema: bool = True) -> DDPM:
    """The model of a checkpoint, with its EMA weights (or the raw ones), ready to sample."""
    state = load_checkpoint(path)
    ddpm = _build(state["config"]["model"], fused)
    ddpm.load_state_dict(ema_model_state(state["ema"]) if ema else state["model"])
    return ddpm.to(device).eval()


def _load_diffusers(path: str, fused: bool, device: torch.device) -> DDPM:
    """A diffusers UNet2DModel folder (Ho et al.'s google/ddpm-cifar10-32, say) as our DDPM."""
    unet, kwargs = interop.load_diffusers(path)
    return (FastDDPM if fused else DDPM)(unet, **kwargs).to(device).eval()


CUDA_GRAPH = {"auto": "auto", "on": True, "off": False}


def generate(ddpm: DDPM, n: int, args, device: torch.device) -> torch.Tensor:
    """n images in [0, 1] as float32 on the CPU, sampled in batches of args.batch_size with one
    generator (the same seed gives the same images whatever the batch size of the last batch)."""
    generator = torch.Generator(device).manual_seed(args.seed)
    out = []
    for start in range(0, n, args.batch_size):
        b = min(args.batch_size, n - start)
        kwargs = dict(generator=generator, device=device, progress=n <= args.batch_size,
                      cuda_graph=CUDA_GRAPH[args.cuda_graph])  # fmt: skip
        if args.sampler == "ddpm":
            images = ddpm.sample(b, **kwargs)
        else:
            images = ddpm.ddim_sample(
                b, steps=args.steps, eta=args.eta, timestep_spacing=args.timestep_spacing, **kwargs
            )
        out.append(((images.float().clamp(-1, 1) + 1) / 2).cpu())
        if n > args.batch_size:
            print(f"  {start + b}/{n} samples", flush=True)
    return torch.cat(out)


def save_images(images: torch.Tensor, path: str) -> None:
    """A PNG grid, or an .npz of uint8 NHWC images under arr_0 (what openai's FID evaluator and
    torch-fidelity read)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".npz"):
        np.savez(path, arr_0=(images * 255).round().byte().permute(0, 2, 3, 1).numpy())
    else:
        save_image(images, path, nrow=int(np.ceil(np.sqrt(images.shape[0]))), padding=1)


def sample(args) -> None:
    device = torch.device(args.device)
    if args.diffusers:
        ddpm = _load_diffusers(args.diffusers, args.fused, device)
    else:
        ddpm = _load_for_sampling(args.checkpoint, args.fused, device, ema=not args.no_ema)
    start = time.perf_counter()
    images = generate(ddpm, args.n, args, device)
    save_images(images, args.out)
    print(f"{args.n} samples ({args.sampler}) in {time.perf_counter() - start:.1f} s: {args.out}")


def export(args) -> None:
    """A checkpoint's weights (EMA by default) as safetensors: our state_dict with the model
    config in the metadata, or a diffusers UNet2DModel folder (--format diffusers)."""
    state = load_checkpoint(args.checkpoint)
    ddpm = _build(state["config"]["model"], fused=False)
    ddpm.load_state_dict(ema_model_state(state["ema"]) if not args.no_ema else state["model"])
    if args.format == "diffusers":
        interop.save_diffusers(ddpm.model, args.out)
    else:
        from safetensors.torch import save_file

        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        weights = {k: v.contiguous() for k, v in ddpm.state_dict().items()}
        save_file(weights, args.out, metadata={"ddpm_fast_config": json.dumps(state["config"]["model"])})
    print(f"exported {'EMA' if not args.no_ema else 'raw'} weights of {args.checkpoint} ({args.format}): {args.out}")


def demo(args) -> None:
    """A small U-Net on the built-in digits: trains for a few minutes on a CPU and writes
    samples.png (from the EMA weights) and loss.png."""
    args.dataset, args.data_root, args.class_name, args.download = "digits", None, None, False
    args.preset, args.image_size, args.dropout = "demo", 8, 0.0  # the digits' own 8x8
    args.timesteps, args.beta_schedule, args.prediction_type = 1000, "linear", "epsilon"
    per_epoch = max(1, 1797 // args.batch_size)  # batches of the digits per epoch
    args.epochs, args.max_steps, args.sample_every = -(-args.steps // per_epoch), args.steps, 0
    args.warmup, args.ema_decay, args.amp, args.num_workers, args.resume = 100, 0.995, "no", 0, False
    args.channels_last = False
    if args.fused and not kernels.use_triton(torch.device(args.device)):
        print(f"demo: no Triton kernels on {args.device} here; the eager PyTorch path (same results)")
        args.fused = False
    start = time.perf_counter()
    train(args)
    ddpm = _load_for_sampling(os.path.join(args.out, "checkpoint.pt"), args.fused, torch.device(args.device))
    generator = torch.Generator(args.device).manual_seed(args.seed)
    images = ddpm.ddim_sample(args.num_samples, steps=args.sample_steps, generator=generator, device=args.device)
    path = os.path.join(args.out, "samples.png")
    images = F.interpolate((images.float() + 1) / 2, scale_factor=4, mode="nearest")  # 8x8 is small to look at
    save_image(images, path, nrow=8, padding=2)
    print(f"demo done in {time.perf_counter() - start:.0f} s: {path}, {os.path.join(args.out, 'loss.png')}")


def _common(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--out", default=out, help=f"output folder (default {out})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help="FastDDPM's Triton kernels (default); --no-fused: the eager DDPM")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddpm-fast", description="Train and sample DDPMs (Ho et al. 2020).")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a DDPM, writing checkpoints, sample grids and a loss log")
    _common(t, "runs/train")
    t.add_argument("--dataset", choices=DATASETS, default="digits")
    t.add_argument("--data-root", help="CIFAR-10's folder (holding cifar-10-batches-py) or an image folder")
    t.add_argument("--class", dest="class_name", help=f"CIFAR-10 class to keep: {', '.join(CIFAR10_CLASSES)} or 0-9")
    t.add_argument("--download", action="store_true", help="download CIFAR-10 into --data-root")
    t.add_argument("--image-size", type=_positive_int, default=32)
    t.add_argument("--preset", choices=sorted(PRESETS), default="cifar10",
                   help="cifar10: the paper's 35.7M U-Net; small: ~1M, trains on a CPU")  # fmt: skip
    t.add_argument("--dropout", type=float, help="override the preset's dropout")
    t.add_argument("--timesteps", type=_positive_int, default=1000)
    t.add_argument("--beta-schedule", choices=["linear", "cosine"], default="linear")
    t.add_argument("--prediction-type", choices=["epsilon", "sample", "v_prediction"], default="epsilon")
    t.add_argument("--epochs", type=_positive_int, default=100)
    t.add_argument("--max-steps", type=_positive_int, help="stop after this many optimiser steps")
    t.add_argument("--batch-size", type=_positive_int, default=128,
                   help="per process: under torchrun the global batch is this x the number of processes")  # fmt: skip
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--warmup", type=int, default=5000, help="learning-rate warmup steps")
    t.add_argument("--ema-decay", type=float, default=0.9999)
    t.add_argument("--amp", choices=["no", "bf16", "fp16"], default="no", help="autocast dtype")
    t.add_argument("--sample-every", type=int, default=1, help="epochs between sample grids (0: never)")
    t.add_argument("--num-samples", type=_positive_int, default=64)
    t.add_argument("--sample-steps", type=_positive_int, default=100, help="DDIM steps for grids (>= T: ancestral)")
    t.add_argument("--num-workers", type=int, default=2)
    t.add_argument("--channels-last", action="store_true",
                   help="the U-Net and its batches NHWC (channels_last): no layout copies, fused")  # fmt: skip
    t.add_argument("--resume", action="store_true", help="go on from OUT/checkpoint.pt")
    t.set_defaults(func=train)

    s = sub.add_parser("sample", help="sample from a checkpoint (or a diffusers folder) into a PNG grid or an .npz")
    _common(s, "samples.png")
    source = s.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a ddpm-fast checkpoint.pt")
    source.add_argument(
        "--diffusers",
        help="a diffusers UNet2DModel folder (config.json + weights), or a pipeline "
        "folder with unet/ and scheduler/: e.g. google/ddpm-cifar10-32, the paper's",
    )
    s.add_argument("--n", type=_positive_int, default=64)
    s.add_argument("--batch-size", type=_positive_int, default=256, help="images sampled at once")
    s.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    s.add_argument("--steps", type=_positive_int, default=100, help="DDIM steps")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    s.add_argument("--timestep-spacing", choices=["leading", "linspace", "trailing"], default="leading",
                   help="DDIM timesteps, as diffusers' DDIMScheduler spaces them (default leading)")  # fmt: skip
    s.add_argument("--cuda-graph", choices=sorted(CUDA_GRAPH), default="auto",
                   help="replay each step as a CUDA graph (auto: on CUDA at batch <= 64)")  # fmt: skip
    s.add_argument("--no-ema", action="store_true", help="the raw weights instead of the EMA")
    s.set_defaults(func=sample)

    e = sub.add_parser("export", help="write a checkpoint's weights as safetensors or a diffusers folder")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--out", required=True, help="a .safetensors file, or a folder with --format diffusers")
    e.add_argument("--format", choices=["safetensors", "diffusers"], default="safetensors")
    e.add_argument("--no-ema", action="store_true", help="the raw weights instead of the EMA")
    e.set_defaults(func=export)

    d = sub.add_parser("demo", help="train a small DDPM on the built-in digits (no download), write samples.png")
    _common(d, "runs/demo")
    d.add_argument("--steps", type=_positive_int, default=1500, help="training steps (default 1500)")
    d.add_argument("--batch-size", type=_positive_int, default=64)
    d.add_argument("--lr", type=float, default=1e-3)
    d.add_argument("--num-samples", type=_positive_int, default=64)
    d.add_argument("--sample-steps", type=_positive_int, default=100, help="DDIM steps for the grid")
    d.set_defaults(func=demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("once")
            args.func(args)
    except (CheckpointError, FileNotFoundError, ConnectionError, ValueError) as e:
        print(f"ddpm-fast {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
