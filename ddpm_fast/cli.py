"""The `ddpm-fast` command: train, sample, export, fid, demo, check.

ddpm-fast demo                                    small model, built-in digits, a few minutes on a CPU
ddpm-fast train --dataset cifar10 --class airplane --data-root data --out runs/airplane
torchrun --nproc_per_node 4 -m ddpm_fast.cli train ...   # DistributedDataParallel
ddpm-fast sample --checkpoint runs/airplane/checkpoint.pt --n 64 --out samples.png
ddpm-fast sample --diffusers ddpm-cifar10-32 --n 64 --out samples.png    # the paper's released model
ddpm-fast export --checkpoint runs/airplane/checkpoint.pt --out airplane.safetensors
ddpm-fast fid cifar10 samples.npz --class airplane --data-root data   # FID (torchmetrics)
ddpm-fast check                                   # this machine: versions, fused vs eager errors, timings
ddpm-fast bench-report bench.json                 # pytest-benchmark JSON -> a markdown table of ratios
"""

import argparse
import json
import math
import os
import shlex
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torchvision.utils import save_image

from ddpm_fast import interop, kernels, runs, sampling
from ddpm_fast.checkpoint import CheckpointError, load_checkpoint, load_weights
from ddpm_fast.data import CIFAR10_CLASSES, DATASETS, DIGITS_TEST, digits_dataset, make_dataset
from ddpm_fast.diffusion import DDPM
from ddpm_fast.ema import ema_model_state
from ddpm_fast.fast import FastDDPM
from ddpm_fast.losslog import NonFiniteLossError
from ddpm_fast.runs import TrainingInterrupted
from ddpm_fast.schedule import BETA_END, BETA_SCHEDULES, BETA_START, VARIANCE_TYPES
from ddpm_fast.tools import benchreport, selfcheck
from ddpm_fast.train import TrainConfig, Trainer, viewable
from ddpm_fast.unet import PRESETS, UNet, UNetConfig


def _number(kind, low=None, high=None, low_open=False, high_open=False, what=""):
    """An argparse type: `kind` in [low, high] (open ends where asked); argparse's error names
    the option."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be finite, got {text}")
        if (low is not None and (value <= low if low_open else value < low)) or (
            high is not None and (value >= high if high_open else value > high)
        ):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


_positive_int = _number(int, 1, what="a positive integer")
_count = _number(int, 0, what="an integer >= 0")
_positive_float = _number(float, 0.0, low_open=True, what="> 0")
_fraction = _number(float, 0.0, 1.0, high_open=True, what="in [0, 1)")
_unit = _number(float, 0.0, 1.0, what="in [0, 1]")
_beta = _number(float, 0.0, 1.0, low_open=True, high_open=True, what="in (0, 1)")


def _device(text: str) -> torch.device:
    try:
        return runs.parse_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"--device {text}: ")) from None


def _resume_command() -> str:
    """The command line that resumed this run: the same arguments with --resume."""
    argv = [a for a in sys.argv[1:] if a != "--overwrite"]
    if "--resume" not in argv:
        argv.append("--resume")
    return " ".join(["ddpm-fast", *map(shlex.quote, argv)])


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
    if args.variance_type == "learned_range":  # the prediction, then the variance values
        overrides["out_channels"] = 2 * channels
    if args.dropout is not None:
        overrides["dropout"] = args.dropout
    unet = UNetConfig(**{**asdict(base), **overrides})
    if args.beta_schedule == "cosine" and {"beta_start", "beta_end"} & getattr(args, "given", set()):
        raise ValueError("--beta-start / --beta-end set the linear and scaled_linear schedules; cosine has neither")
    ddpm = {name: getattr(args, name) for name in _RUN_DDPM_OPTIONS}
    # the data the run trains on: --resume goes on with it (and refuses another)
    data = {"dataset": args.dataset, "class_name": args.class_name}
    return {"unet": asdict(unet), "ddpm": ddpm, "data": data}


_RUN_DDPM_OPTIONS = ("timesteps", "beta_schedule", "prediction_type", "variance_type", "beta_start", "beta_end",
                     "snr_gamma")  # fmt: skip
# what a checkpoint from before an option existed was trained with
_DDPM_DEFAULTS = {"beta_start": BETA_START, "beta_end": BETA_END, "snr_gamma": None}
_PRESET_FREE = ("in_channels", "out_channels", "image_size", "dropout")  # set by other options than --preset


def _flag(dest: str) -> str:
    return "--class" if dest == "class_name" else "--" + dest.replace("_", "-")


def _resume_settings(args, saved: dict) -> None:
    """Before any work: a --resume run goes on with the checkpoint's model, schedule and data.
    An option given on the command line that contradicts the checkpoint is refused by name (it
    was ignored, or failed late); one not given takes the checkpoint's value."""
    unet, ddpm, data = saved["unet"], saved["ddpm"], saved.get("data")  # "data": checkpoints from 2026-12 on
    given = getattr(args, "given", set(vars(args)))

    def refuse(dest, value, theirs):
        raise ValueError(f"--resume: {_flag(dest)} {value} does not match the checkpoint's run ({theirs}); drop "
                         f"{_flag(dest)} to go on with the run, or train into a new --out")  # fmt: skip

    for dest in _RUN_DDPM_OPTIONS:
        theirs = ddpm.get(dest, _DDPM_DEFAULTS.get(dest))
        if dest in given and getattr(args, dest) != theirs:
            refuse(dest, getattr(args, dest), f"{_flag(dest)} {theirs}")
    if "image_size" in given and args.image_size != unet["image_size"]:
        refuse("image_size", args.image_size, f"{unet['image_size']}x{unet['image_size']} images")
    if "dropout" in given and args.dropout != unet["dropout"]:
        refuse("dropout", args.dropout, f"dropout {unet['dropout']}")
    if "preset" in given:
        preset = asdict(PRESETS[args.preset])
        differ = [k for k, v in preset.items() if k not in _PRESET_FREE and k in unet and _plain(unet[k]) != _plain(v)]
        if differ:
            refuse("preset", args.preset, ", ".join(f"{k}={unet[k]}" for k in differ))
    if data is not None:
        for dest in ("dataset", "class_name"):
            if dest in given and getattr(args, dest) != data[dest]:
                refuse(dest, getattr(args, dest), f"{_flag(dest)} {data[dest]}")
            setattr(args, dest, data[dest])
    elif "dataset" in given and (args.dataset == "digits") != (unet["in_channels"] == 1):
        refuse("dataset", args.dataset, f"{unet['in_channels']}-channel images")
    elif "dataset" not in given and unet["in_channels"] != 1:  # the default (digits) cannot be its data
        raise ValueError("--resume: this checkpoint (from before data sets were recorded) does not say what it was "
                         "trained on; pass its --dataset (and --class, --data-root)")  # fmt: skip
    args.image_size = unet["image_size"]


def _plain(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def _setup_distributed(device: torch.device) -> torch.device:
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device.type == "cuda"
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
        if use_cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            return torch.device("cuda", local)
    return device


def _hints(args, ddpm: DDPM, trainer: Trainer, device: torch.device) -> None:
    """Say before the run when it cannot give samples worth looking at."""
    per_epoch = trainer.steps_per_epoch
    planned = args.epochs * per_epoch if args.max_steps is None else min(args.max_steps, args.epochs * per_epoch)
    n_params = sum(p.numel() for p in ddpm.model.parameters())
    if device.type == "cpu" and n_params > 5_000_000:
        print(f"note: a {n_params / 1e6:.1f}M-parameter U-Net takes many seconds per step on a CPU; for a run that "
              "gives samples in minutes use `ddpm-fast demo`, or --preset small --image-size 16")  # fmt: skip
    if args.warmup > planned:
        print(f"note: --warmup {args.warmup} is longer than this run ({planned} steps): the learning rate never "
              f"reaches --lr {args.lr:g}, and the samples will look like noise; pass a smaller --warmup")  # fmt: skip


def train(args) -> None:
    rank = int(os.environ.get("RANK", "0"))
    lock = runs.prepare_run_dir(args.out, args.resume, args.overwrite) if rank == 0 else None
    try:
        _train(args)
    finally:
        if lock is not None:
            lock.release()


def _eager_where_no_kernels(args, device: torch.device) -> None:
    """The command's own note, printed before any progress bar, where the fused kernels cannot run
    on `device`: the eager path then (same results). A FastDDPM would warn from inside the first
    step, attributed to the console script and drawn into the bar."""
    if args.fused and not kernels.use_triton(device):
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{args.command}: no Triton kernels on {device} here ({kernels.path_setting()}); the eager PyTorch "
                  "path (same results)")  # fmt: skip
        args.fused = False


def _train(args) -> None:
    device = _setup_distributed(args.device)
    rank = dist.get_rank() if dist.is_initialized() else 0
    _eager_where_no_kernels(args, device)
    try:
        resume_path = os.path.join(args.out, "checkpoint.pt") if args.resume else None
        saved_model = load_checkpoint(resume_path)["config"]["model"] if resume_path else None
        if saved_model is not None:
            _resume_settings(args, saved_model)
        channels = 1 if args.dataset == "digits" else 3
        if saved_model is not None:
            channels = saved_model["unet"]["in_channels"]
        dataset = make_dataset(args.dataset, args.image_size, args.data_root, args.class_name, args.download, channels,
                               getattr(args, "digits_split", "all"))  # fmt: skip
        config = TrainConfig(
            out_dir=args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
            ema_decay=args.ema_decay, ema_warmup=args.ema_warmup, ema_power=args.ema_power, amp=args.amp,
            sample_every=args.sample_every, num_samples=args.num_samples,
            sample_steps=args.sample_steps, seed=args.seed, max_steps=args.max_steps, num_workers=args.num_workers,
            channels_last=args.channels_last, grad_accum=args.grad_accum, save_every=args.save_every, keep=args.keep,
            tensorboard=args.tensorboard, fid_every=args.fid_every, fid_samples=args.fid_samples,
        )  # fmt: skip
        model_config = _model_config(args, channels)
        if saved_model is not None:  # the model comes from the checkpoint (and now names its data)
            model_config = {**saved_model, "data": model_config["data"]}
        torch.manual_seed(args.seed)
        ddpm = _build(model_config, args.fused)
        trainer = Trainer(ddpm, dataset, config, device, model_config, fid_weights=args.inception_weights)
        if resume_path:
            trainer.resume(resume_path)
        if rank == 0:
            n_params = sum(p.numel() for p in ddpm.model.parameters())
            world = dist.get_world_size() if dist.is_initialized() else 1
            print(f"training a {n_params:,}-parameter U-Net on {len(dataset):,} images ({args.dataset}) on {device}"
                  f" x {world}, {ddpm.kernel_path(device)}; from step {trainer.step}; out: {args.out}")  # fmt: skip
            _hints(args, ddpm, trainer, device)
        try:
            trainer.train()
        except TrainingInterrupted as e:
            if rank == 0:
                print(f"\n{e}" + (f"; go on with:\n  {_resume_command()}" if e.saved else ""), file=sys.stderr)
            raise
        if rank == 0:
            print(f"done at step {trainer.step}: {trainer.checkpoint_path}, {trainer.log_path}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _load_model(path: str, fused: bool, ema: bool = True) -> tuple[DDPM, dict]:
    """(the model of a checkpoint with its EMA weights or the raw ones, its model config). `path`:
    a checkpoint.pt, or a .safetensors file `export` wrote (its weights as exported)."""
    if path.endswith(".safetensors"):
        return _load_export(path, fused)
    state = load_checkpoint(path)
    if ema and "ema" not in state:
        raise CheckpointError(f"{path!r} holds no EMA weights ('ema'); --no-ema uses its raw weights")
    ddpm = _build(state["config"]["model"], fused)
    load_weights(ddpm, ema_model_state(state["ema"]) if ema else state["model"], path)
    return ddpm, state["config"]["model"]


def _load_export(path: str, fused: bool) -> tuple[DDPM, dict]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path!r}")
    try:
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
        weights = load_file(path)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path!r} is not a readable safetensors file: {e}") from None
    if "ddpm_fast_config" not in metadata:
        raise CheckpointError(f"{path!r} is not a ddpm-fast export (no ddpm_fast_config in its metadata); a "
                              "diffusers model folder goes with --diffusers")  # fmt: skip
    config = json.loads(metadata["ddpm_fast_config"])
    ddpm = _build(config, fused)
    load_weights(ddpm, weights, path)
    return ddpm, config


def _load_for_sampling(path: str, fused: bool, device: torch.device, ema: bool = True) -> DDPM:
    """The model of a checkpoint (or of our .safetensors export), ready to sample."""
    return _load_model(path, fused, ema)[0].to(device).eval()


def _load_diffusers(path: str, fused: bool, device: torch.device) -> DDPM:
    """A diffusers UNet2DModel folder (Ho et al.'s google/ddpm-cifar10-32, say) as our DDPM."""
    unet, kwargs = interop.load_diffusers(path)
    return (FastDDPM if fused else DDPM)(unet, **kwargs).to(device).eval()


CUDA_GRAPH = {"auto": "auto", "on": True, "off": False}


def draw_batch(ddpm: DDPM, args, device: torch.device):
    """draw(b, generators): b images in [-1, 1] from the chosen sampler, one generator per image."""

    def draw(b: int, generators) -> torch.Tensor:
        kwargs = dict(generator=generators, device=device, progress=False, cuda_graph=CUDA_GRAPH[args.cuda_graph])
        try:
            if args.sampler == "ddpm":
                return ddpm.sample(b, **kwargs)
            if args.sampler == "dpm++":
                return ddpm.dpm_solver_sample(b, steps=args.steps, **kwargs)
            return ddpm.ddim_sample(b, steps=args.steps, eta=args.eta, timestep_spacing=args.timestep_spacing, **kwargs)
        except RuntimeError as e:  # torch.OutOfMemoryError on a GPU; the CPU allocator's RuntimeError
            if not isinstance(e, torch.OutOfMemoryError) and "allocate" not in str(e):
                raise
            why = " ".join(str(e).split())[:160]
            raise MemoryError(f"--batch-size {args.batch_size}: a batch of {b} images does not fit in {device}'s "
                              f"memory ({why}); pass a smaller --batch-size") from None  # fmt: skip

    return draw


def save_images(images: np.ndarray, path: str) -> None:
    """uint8 NHWC images as a PNG grid, or an .npz under arr_0 (what openai's FID evaluator and
    torch-fidelity read), written to a temporary file and renamed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".npz"):

        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, arr_0=images)
    else:
        grid = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255

        def write(tmp):
            save_image(grid, tmp, nrow=int(np.ceil(np.sqrt(images.shape[0]))), padding=1,
                       format=os.path.splitext(path)[1][1:].replace("jpg", "jpeg"))  # fmt: skip

    runs.write_atomically(path, write)


SAMPLE_EXTENSIONS = (*runs.IMAGE_EXTENSIONS, ".npz")


def sample(args) -> None:
    """--num-images images, on this process or split over torchrun's ranks, each from its own
    generator seeded from (--seed, its index); resumable (ddpm_fast.sampling)."""
    runs.check_output_file(args.out, SAMPLE_EXTENSIONS)  # before any sampling
    device = _setup_distributed(args.device)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        _eager_where_no_kernels(args, device)
    if args.diffusers:
        ddpm = _load_diffusers(args.diffusers, args.fused, device)
    else:
        ddpm = _load_for_sampling(args.checkpoint, args.fused, device, ema=not args.no_ema)
    source = os.path.abspath(args.diffusers or args.checkpoint)
    settings = {"source": source, "ema": not args.no_ema and not args.diffusers, "sampler": args.sampler,
                "seed": args.seed, "num_images": args.n}  # fmt: skip
    if args.sampler != "ddpm":
        settings["steps"] = args.steps
    if args.sampler == "ddim":
        settings.update(eta=args.eta, timestep_spacing=args.timestep_spacing)
    start = time.perf_counter()
    images = sampling.sample_images(ddpm, args.n, args, device, draw_batch(ddpm, args, device), settings)
    if rank == 0:
        save_images(images, args.out)
        sampling.finish(args.out)
        world = dist.get_world_size() if dist.is_initialized() else 1
        print(f"{args.n} samples ({args.sampler}, {world} process(es)) in {time.perf_counter() - start:.1f} s: "
              f"{args.out}")  # fmt: skip


def export(args) -> None:
    """A checkpoint's weights (EMA by default) as safetensors: our state_dict with the model
    config in the metadata, or a diffusers UNet2DModel folder (--format diffusers)."""
    if args.format == "safetensors":
        runs.check_output_file(args.out, (".safetensors",))
    elif os.path.isfile(args.out):
        raise runs.RunDirError(f"--out {args.out!r} is a file; --format diffusers writes a folder")
    ddpm, model_config = _load_model(args.checkpoint, fused=False, ema=not args.no_ema)
    if args.format == "diffusers":
        interop.save_diffusers_pipeline(ddpm, args.out)
    else:
        from safetensors.torch import save_file

        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        weights = {k: v.contiguous() for k, v in ddpm.state_dict().items()}
        save_file(weights, args.out, metadata={"ddpm_fast_config": json.dumps(model_config)})
    print(f"exported {'EMA' if not args.no_ema else 'raw'} weights of {args.checkpoint} ({args.format}): {args.out}")


def fid(args) -> None:
    """FID between two image sources (and the Inception Score of the second with --isc)."""
    from ddpm_fast import metrics

    kwargs = dict(weights=args.inception_weights, batch_size=args.batch_size, device=args.device, limit=args.limit,
                  class_name=args.class_name, data_root=args.data_root)  # fmt: skip
    for name in (args.a, args.b):
        if name not in ("cifar10", "digits") and not os.path.exists(name):
            raise FileNotFoundError(f"{name!r}: no such .npz file or image folder (nor cifar10 / digits)")
    metrics.inception_weights(args.inception_weights)  # fails within seconds when it cannot be had
    kwargs["device"] = _setup_distributed(args.device)  # under torchrun: the ranks split the images
    rank = dist.get_rank() if dist.is_initialized() else 0
    value = metrics.fid(args.a, args.b, **kwargs)
    if rank != 0:
        return
    print(f"FID {value:.3f}  ({args.a} vs {args.b}; torchmetrics, torch-fidelity's Inception)")
    if args.isc:
        mean, std = metrics.inception_score(args.b, **kwargs)
        print(f"Inception Score of {args.b}: {mean:.3f} +- {std:.3f}")


DEMO_TIMESTEPS = 1000


def demo(args) -> None:
    """A small U-Net on the built-in digits: trains for a few minutes on a CPU and writes
    samples.png (from the EMA weights) and loss.png."""
    args.dataset, args.data_root, args.class_name, args.download = "digits", None, None, False
    args.preset, args.image_size, args.dropout = "demo", 8, 0.0  # the digits' own 8x8
    args.timesteps, args.beta_schedule, args.prediction_type = DEMO_TIMESTEPS, "linear", "epsilon"
    args.beta_start, args.beta_end, args.snr_gamma = BETA_START, BETA_END, None
    args.ema_warmup, args.ema_power = False, 2 / 3
    per_epoch = max(1, (1797 - DIGITS_TEST) // args.batch_size)  # batches of the training digits per epoch
    args.epochs, args.max_steps, args.sample_every = -(-args.steps // per_epoch), args.steps, 0
    args.warmup, args.ema_decay, args.amp, args.num_workers, args.resume = 100, 0.995, "no", 0, False
    args.variance_type, args.digits_split = "fixed_small", "train"  # the last 360 digits are held out
    args.channels_last, args.grad_accum, args.save_every, args.keep, args.tensorboard = False, 1, 0, 0, False
    args.fid_every, args.fid_samples, args.inception_weights = 0, 1, None
    _eager_where_no_kernels(args, args.device)
    start = time.perf_counter()
    lock = runs.prepare_run_dir(args.out, resume=False, overwrite=args.overwrite)
    try:
        _train(args)
        ddpm = _load_for_sampling(os.path.join(args.out, "checkpoint.pt"), args.fused, args.device)
        generator = torch.Generator(args.device).manual_seed(args.seed)
        images = ddpm.ddim_sample(args.num_samples, steps=args.sample_steps, generator=generator, device=args.device)
        path = os.path.join(args.out, "samples.png")
        save_image(viewable((images.float() + 1) / 2), path, nrow=8, padding=2)  # 8x8 is small to look at
        if args.quality:
            _demo_quality(ddpm, args)
    finally:
        lock.release()
    print(f"demo done in {time.perf_counter() - start:.0f} s: {path}, {os.path.join(args.out, 'loss.png')}")


def _demo_quality(ddpm: DDPM, args) -> None:
    """The demo's quality figure: the Frechet distance between 360 samples and the 360 held-out
    digits, in the feature space of a small classifier trained on the 1,437 training digits,
    next to the same distance for 360 real training digits (the floor a perfect model reaches)."""
    from ddpm_fast import metrics

    train_x, train_y = digits_dataset(8, "train").tensors
    test_x, test_y = digits_dataset(8, "test").tensors
    net = metrics.train_digits_features(train_x, train_y, seed=args.seed)
    accuracy = (net.logits(test_x).argmax(1) == test_y).float().mean().item()
    generator = torch.Generator(args.device).manual_seed(args.seed + 1)
    samples = ddpm.ddim_sample(DIGITS_TEST, steps=args.sample_steps, generator=generator, device=args.device,
                               progress=False).cpu()  # fmt: skip
    real = train_x[torch.randperm(len(train_x), generator=torch.Generator().manual_seed(args.seed))[:DIGITS_TEST]]
    fd_samples = metrics.frechet_distance(net, test_x, samples)
    fd_real = metrics.frechet_distance(net, test_x, real)
    print(f"Frechet distance to the {DIGITS_TEST} held-out digits, in a digits classifier's features "
          f"({accuracy:.1%} held-out accuracy): samples {fd_samples:.2f}, real training digits {fd_real:.2f} "
          "(lower is better; the real digits' value is the floor)")  # fmt: skip


def _common(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--out", default=out, help="output folder" if "." not in out else "output file")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1, ...")  # fmt: skip
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help="FastDDPM's Triton kernels; --no-fused: the eager DDPM")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddpm-fast", description="Train and sample DDPMs (Ho et al. 2020).")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.commands = sub.choices  # name -> its parser
    fmt = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}  # --help shows every default

    t = sub.add_parser("train", help="train a DDPM, writing checkpoints, sample grids and a loss log", **fmt)
    _common(t, "runs/train")
    t.add_argument("--dataset", choices=DATASETS, default="digits", help="training images")
    t.add_argument("--data-root", help="CIFAR-10's folder (holding cifar-10-batches-py) or an image folder")
    t.add_argument("--class", dest="class_name", help=f"CIFAR-10 class to keep: {', '.join(CIFAR10_CLASSES)} or 0-9")
    t.add_argument("--download", action="store_true", help="download CIFAR-10 into --data-root")
    t.add_argument("--image-size", type=_positive_int, default=32, help="images are resized to this")
    t.add_argument("--preset", choices=sorted(PRESETS), default="cifar10",
                   help="cifar10: the paper's 35.7M U-Net; small: ~1M, trains on a CPU")  # fmt: skip
    t.add_argument("--dropout", type=_fraction, help="override the preset's dropout")
    t.add_argument("--timesteps", type=_positive_int, default=1000, help="diffusion steps T")
    t.add_argument("--beta-schedule", choices=list(BETA_SCHEDULES), default="linear",
                   help="noise schedule (cosine is diffusers' squaredcos_cap_v2)")  # fmt: skip
    t.add_argument("--beta-start", type=_beta, default=BETA_START, help="the first beta (linear, scaled_linear)")
    t.add_argument("--beta-end", type=_beta, default=BETA_END, help="the last beta (linear, scaled_linear)")
    t.add_argument("--snr-gamma", type=_positive_float, help="min-SNR-gamma loss weighting (Hang et al. 2023), e.g. 5")
    t.add_argument("--prediction-type", choices=["epsilon", "sample", "v_prediction"], default="epsilon",
                   help="what the U-Net predicts")  # fmt: skip
    t.add_argument("--variance-type", choices=list(VARIANCE_TYPES), default="fixed_small",
                   help="the reverse process variance: posterior (small), beta_t (large), or learned_range (the U-Net "
                        "outputs it too, trained by the hybrid loss; Nichol & Dhariwal 2021)")  # fmt: skip
    t.add_argument("--epochs", type=_positive_int, default=100, help="passes over the data")
    t.add_argument("--max-steps", type=_positive_int, help="stop after this many optimiser steps")
    t.add_argument("--batch-size", type=_positive_int, default=128,
                   help="per process: under torchrun the global batch is this x the number of processes")  # fmt: skip
    t.add_argument("--lr", type=_positive_float, default=2e-4, help="Adam's learning rate")
    t.add_argument("--warmup", type=_count, default=5000, help="learning-rate warmup steps")
    t.add_argument("--ema-decay", type=_fraction, default=0.9999, help="EMA of the weights, in [0, 1)")
    t.add_argument("--ema-warmup", action="store_true",
                   help="EMA decay min(--ema-decay, 1 - (1 + step) ^ -power): diffusers' use_ema_warmup")  # fmt: skip
    t.add_argument("--ema-power", type=_positive_float, default=2 / 3, help="the warmup's power (3/4 for short runs)")
    t.add_argument("--amp", choices=["no", "bf16", "fp16"], default="no", help="autocast dtype")
    t.add_argument("--sample-every", type=_count, default=1, help="epochs between sample grids (0: never)")
    t.add_argument("--num-samples", type=_positive_int, default=64, help="images in each grid")
    t.add_argument("--sample-steps", type=_positive_int, default=100, help="DDIM steps for grids (>= T: ancestral)")
    t.add_argument("--num-workers", type=_count, default=2, help="data-loading processes")
    t.add_argument("--channels-last", action="store_true",
                   help="the U-Net and its batches NHWC (channels_last): no layout copies, fused")  # fmt: skip
    t.add_argument(
        "--grad-accum",
        type=_positive_int,
        default=1,
        help="micro-batches of --batch-size per optimiser step (the batch is this x --batch-size)",
    )
    t.add_argument(
        "--save-every",
        type=_count,
        default=0,
        help="also keep a checkpoint every this many steps as OUT/checkpoints/step_N.pt (0: no)",
    )
    t.add_argument("--keep", type=_count, default=0, help="the newest K of those checkpoints stay (0: all)")
    t.add_argument(
        "--tensorboard",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="loss, lr, FID and sample grids under OUT/tb (default: when tensorboard is installed)",
    )
    t.add_argument("--fid-every", type=_count, default=0, help="epochs between FIDs of the EMA weights (0: never)")
    t.add_argument("--fid-samples", type=_positive_int, default=10_000, help="images generated for each FID")
    t.add_argument("--inception-weights", help="the FID Inception weights file (default: torch's hub cache)")
    t.add_argument("--resume", action="store_true", help="go on from OUT/checkpoint.pt")
    t.add_argument("--overwrite", action="store_true", help="start over in an --out that holds a run (its files go)")
    t.set_defaults(func=train)

    s = sub.add_parser("sample", help="sample from a checkpoint (or a diffusers folder) into a PNG grid or an .npz",
                       **fmt)  # fmt: skip
    _common(s, "samples.png")
    source = s.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a ddpm-fast checkpoint.pt, or a .safetensors file from `export`")
    source.add_argument(
        "--diffusers",
        help="a diffusers UNet2DModel folder (config.json + weights), or a pipeline "
        "folder with unet/ and scheduler/: e.g. google/ddpm-cifar10-32, the paper's",
    )
    s.add_argument("--num-images", "--n", dest="n", type=_positive_int, default=64,
                   help="number of images (--n: the old name; torchrun refuses it as ambiguous)")  # fmt: skip
    s.add_argument("--resume", action="store_true",
                   help="go on with a stopped run: sample only the images not in OUT.parts yet")  # fmt: skip
    s.add_argument("--batch-size", type=_positive_int, default=256, help="images sampled at once")
    s.add_argument("--sampler", choices=["ddpm", "ddim", "dpm++"], default="ddpm",
                   help="ancestral (all T steps), DDIM, or DPM-Solver++(2M) (diffusers' DPMSolver)")  # fmt: skip
    s.add_argument("--steps", type=_positive_int, default=100, help="DDIM or DPM-Solver++ steps (20 suits DPM++)")
    s.add_argument("--eta", type=_unit, default=0.0, help="DDIM eta in [0, 1] (0: deterministic)")
    s.add_argument("--timestep-spacing", choices=["leading", "linspace", "trailing"], default="leading",
                   help="DDIM timesteps, as diffusers' DDIMScheduler spaces them (default leading)")  # fmt: skip
    s.add_argument("--cuda-graph", choices=sorted(CUDA_GRAPH), default="auto",
                   help="replay each step as a CUDA graph (auto: on CUDA at batch <= 64)")  # fmt: skip
    s.add_argument("--no-ema", action="store_true", help="the raw weights instead of the EMA")
    s.set_defaults(func=sample)

    e = sub.add_parser("export", help="write a checkpoint's weights as safetensors or a diffusers folder", **fmt)
    e.add_argument("--checkpoint", required=True, help="a ddpm-fast checkpoint.pt")
    e.add_argument("--out", required=True, help="a .safetensors file, or a folder with --format diffusers")
    e.add_argument("--format", choices=["safetensors", "diffusers"], default="safetensors", help="output format")
    e.add_argument("--no-ema", action="store_true", help="the raw weights instead of the EMA")
    e.set_defaults(func=export)

    f = sub.add_parser("fid", help="FID between two sets of images (.npz, image folders, cifar10)", **fmt)
    f.add_argument("a", help="the reference: an .npz (arr_0, uint8 NHWC), an image folder, cifar10 or digits")
    f.add_argument("b", help="the images to score, the same kinds")
    f.add_argument("--class", dest="class_name", help="with cifar10: one class (airplane ... or 0-9)")
    f.add_argument("--data-root", default="data", help="with cifar10: the folder holding cifar-10-batches-py")
    f.add_argument("--limit", type=_positive_int, help="use at most this many images of each")
    f.add_argument("--batch-size", type=_positive_int, default=200, help="images through Inception at once")
    f.add_argument("--isc", action="store_true", help="also the Inception Score of the second set")
    f.add_argument("--inception-weights", help="the Inception weights file (default: torch's hub cache)")
    f.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, ...")  # fmt: skip
    f.set_defaults(func=fid)

    d = sub.add_parser("demo", help="train a small DDPM on the built-in digits (no download), write samples.png",
                       **fmt)  # fmt: skip
    _common(d, "runs/demo")
    d.add_argument("--steps", type=_positive_int, default=1500, help="training steps")
    d.add_argument("--batch-size", type=_positive_int, default=64, help="images per step")
    d.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam's learning rate")
    d.add_argument("--num-samples", type=_positive_int, default=64, help="images in samples.png")
    d.add_argument("--overwrite", action="store_true", help="start over in an --out that holds a run")
    d.add_argument("--quality", action=argparse.BooleanOptionalAction, default=True,
                   help="print the Frechet distance of 360 samples to the held-out digits")  # fmt: skip
    demo_steps = _number(int, 1, DEMO_TIMESTEPS, what=f"in [1, {DEMO_TIMESTEPS}] (the demo's T)")
    d.add_argument("--sample-steps", type=demo_steps, default=100, help="DDIM steps for the grid")
    d.set_defaults(func=demo)

    c = sub.add_parser("check", help="on this machine: versions, each fused op against its eager twin (max error, "
                       "pass/fail, exit 1 on a failure), timings of the ops and of a train and a sampling step",
                       **fmt)  # fmt: skip
    selfcheck.add_arguments(c)
    c.set_defaults(func=check)

    r = sub.add_parser("bench-report", help="pytest-benchmark JSON as one markdown table of ratios (fused vs eager, "
                       "vs torch.compile, vs SDPA)", **fmt)  # fmt: skip
    benchreport.add_arguments(r)
    r.set_defaults(func=benchreport.main)
    return parser


def check(args) -> None:
    status = selfcheck.main(args)
    if status:
        sys.exit(status)


_UNSET = object()


def _given_options(argv: list[str] | None, args) -> set[str]:
    """The options given on the command line, told apart from defaults by parsing again with
    every default replaced by a marker (not a string: argparse would convert it)."""
    parser = build_parser()
    parser.commands[args.command].set_defaults(**{k: _UNSET for k in vars(args) if k != "func"})
    return {k for k, v in vars(parser.parse_args(argv)).items() if v is not _UNSET} - {"command", "func"}


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "train":  # what --resume checks against the checkpoint (train has no append options)
        args.given = _given_options(argv, args)
    try:
        args.func(args)
    except (CheckpointError, OSError, ValueError, MemoryError) as e:  # OSError: missing files, network, permissions
        print(f"ddpm-fast {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLossError as e:
        print(f"ddpm-fast {args.command}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except TrainingInterrupted as e:
        sys.exit(e.exit_code)  # 130 for SIGINT, 143 for SIGTERM: what shells and schedulers expect
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
