"""The `ddpm-fast` command.

ddpm-fast demo [--steps N] [--out DIR]   train a small DDPM on the built-in 8x8 digits
                                          (no download) and write a sample grid
"""

import argparse
import csv
import os
import time

import torch
from torch.utils.data import DataLoader
from torchvision.utils import save_image
from tqdm.auto import tqdm

from ddpm_fast.data import digits_dataset
from ddpm_fast.diffusion import DDPM
from ddpm_fast.train import train_step
from ddpm_fast.unet import UNet, UNetConfig

DEMO_UNET = UNetConfig(
    in_channels=1, image_size=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0,
    num_groups=8,
)  # fmt: skip


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def demo(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    data = digits_dataset(DEMO_UNET.image_size)
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True)
    ddpm = DDPM(UNet(DEMO_UNET), image_size=DEMO_UNET.image_size, channels=1, timesteps=args.timesteps).to(device)
    opt = torch.optim.Adam(ddpm.parameters(), lr=args.lr)
    n_params = sum(p.numel() for p in ddpm.model.parameters())
    print(f"demo: {n_params:,}-parameter U-Net on {len(data)} digits at 16x16, {args.steps} steps on {device}")

    losses, step, start = [], 0, time.perf_counter()
    bar = tqdm(total=args.steps, desc="train")
    while step < args.steps:
        for x0, _ in loader:
            loss = train_step(ddpm, x0.to(device), opt)
            losses.append(loss.item())
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if step == args.steps:
                break
    bar.close()

    with open(os.path.join(args.out, "loss.csv"), "w", newline="") as f:
        csv.writer(f).writerows([("step", "loss"), *enumerate(losses, 1)])
    ddpm.eval()
    generator = torch.Generator(device).manual_seed(args.seed)
    if args.sampling_steps >= args.timesteps:
        images = ddpm.sample(args.num_samples, generator=generator, device=device)
    else:
        images = ddpm.ddim_sample(args.num_samples, steps=args.sampling_steps, generator=generator, device=device)
    path = os.path.join(args.out, "samples.png")
    save_image((images + 1) / 2, path, nrow=8, padding=1)
    elapsed = time.perf_counter() - start
    first, last = sum(losses[:50]) / len(losses[:50]), sum(losses[-50:]) / len(losses[-50:])
    print(f"loss {first:.4f} (first 50 steps) -> {last:.4f} (last 50); {elapsed:.0f} s; samples in {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddpm-fast", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="train a small DDPM on the built-in digits and write a sample grid")
    p.add_argument("--steps", type=_positive_int, default=500, help="training steps (default 500)")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--timesteps", type=_positive_int, default=1000, help="diffusion steps T")
    p.add_argument("--num-samples", type=_positive_int, default=64)
    p.add_argument(
        "--sampling-steps", type=_positive_int, default=100,
        help="DDIM steps for the sample grid; T or more samples with all T ancestral steps (default 100)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.set_defaults(func=demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
