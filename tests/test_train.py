"""Trainer: checkpoints, exact resume, Ctrl-C, logs and grids, DDP on two CPU processes, the CLI."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import Subset

from ddpm_fast import DDPM, UNet, UNetConfig, interop
from ddpm_fast.cli import main
from ddpm_fast.data import digits_dataset
from ddpm_fast.train import TrainConfig, Trainer, load_checkpoint

TINY = UNetConfig(in_channels=1, image_size=8, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                  num_groups=4, dropout=0.1)  # fmt: skip
DATA = Subset(digits_dataset(8), range(64))  # 4 batches of 16 per epoch


def trainer(out, **overrides) -> Trainer:
    torch.manual_seed(0)
    ddpm = DDPM(UNet(TINY), image_size=8, channels=1, timesteps=20)
    kwargs = dict(out_dir=str(out), epochs=2, batch_size=16, warmup=3, sample_every=1, num_samples=4,
                  sample_steps=3, progress=False, lr=1e-3, ema_decay=0.9)  # fmt: skip
    return Trainer(ddpm, DATA, TrainConfig(**{**kwargs, **overrides}), "cpu", {"unet": {}, "ddpm": {}})


def test_a_short_run_writes_checkpoint_grids_and_logs(tmp_path):
    t = trainer(tmp_path)
    losses = t.train()
    assert [s for s, _ in losses] == list(range(1, 9))
    for name in ("checkpoint.pt", "loss.csv", "loss.png", "samples/epoch_0001.png", "samples/epoch_0002.png"):
        assert os.path.getsize(tmp_path / name) > 0, name
    from PIL import Image

    # 4 samples of 8x8, enlarged 4x (as the demo's) to be seen: 2 x 2 of 32 px with 1 px padding
    assert Image.open(tmp_path / "samples/epoch_0001.png").size == (2 * 32 + 3, 2 * 32 + 3)
    rows = (tmp_path / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,epoch,loss,lr" and len(rows) == 9
    state = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert state["step"] == 8 and state["epoch"] == 2 and state["batch_in_epoch"] == 0
    assert not any(n.endswith(".tmp") or ".tmp." in n for n in os.listdir(tmp_path))
    ema = {k[7:]: v for k, v in state["ema"].items() if k.startswith("module.")}
    assert not torch.equal(ema["model.conv_in.weight"], state["model"]["model.conv_in.weight"])


def test_resume_gives_the_losses_of_an_uninterrupted_run(tmp_path):
    straight = trainer(tmp_path / "a").train()
    first = trainer(tmp_path / "b", max_steps=3)  # stops in the middle of epoch 1
    first.train()
    second = trainer(tmp_path / "b")
    second.resume()
    assert second.step == 3 and second.batch_in_epoch == 3
    resumed = second.train()
    assert first.losses + resumed == straight  # exactly: same data order, noise, dropout
    log = (tmp_path / "b" / "loss.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in log[1:]] == list(range(1, 9))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_with_gloo_end_with_identical_weights(tmp_path):
    import ddp_worker

    mp.spawn(ddp_worker.run, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert set(r0["indices"]).isdisjoint(r1["indices"])  # each rank reads its own shard
    assert r0["losses"] != r1["losses"]
    for (name, a), b in zip(r0["state"].items(), r1["state"].values()):
        assert torch.equal(a, b), name
    assert os.path.isfile(tmp_path / "checkpoint.pt")  # written by rank 0 only


def test_cli_train_then_sample(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--dataset", "digits", "--image-size", "8", "--preset", "demo", "--max-steps", "2",
            "--batch-size", "16", "--timesteps", "20", "--sample-every", "0", "--num-workers", "0", "--no-fused",
            "--out", str(out), "--device", "cpu"]  # fmt: skip
    main(args)
    main(args[:8] + ["4"] + args[9:] + ["--resume"])  # go on to step 4 from the checkpoint
    assert load_checkpoint(str(out / "checkpoint.pt"))["step"] == 4
    for target in ("grid.png", "grid.npz"):
        main(["sample", "--checkpoint", str(out / "checkpoint.pt"), "--n", "4", "--sampler", "ddim", "--steps", "3",
              "--out", str(tmp_path / target), "--device", "cpu", "--no-fused"])  # fmt: skip
        assert os.path.getsize(tmp_path / target) > 0
    import numpy as np

    samples = np.load(tmp_path / "grid.npz")["arr_0"]  # the key openai's FID evaluator and torch-fidelity read
    assert samples.shape == (4, 8, 8, 1) and samples.dtype == np.uint8


def test_cli_export_safetensors_and_diffusers_then_sample_from_the_folder(tmp_path, capsys):
    """The weights of a run as safetensors (our keys, the config in the metadata) and as a
    diffusers folder, which `sample --diffusers` reads back to the checkpoint's own samples."""
    from safetensors import safe_open

    out = tmp_path / "run"
    main(["train", "--dataset", "digits", "--image-size", "8", "--preset", "demo", "--max-steps", "2",
          "--batch-size", "16", "--timesteps", "20", "--sample-every", "0", "--num-workers", "0", "--no-fused",
          "--beta-schedule", "cosine", "--prediction-type", "v_prediction", "--variance-type", "fixed_large",
          "--out", str(out), "--device", "cpu"])  # fmt: skip
    ckpt = str(out / "checkpoint.pt")
    main(["export", "--checkpoint", ckpt, "--out", str(tmp_path / "w.safetensors")])
    state = load_checkpoint(ckpt)
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        assert set(f.keys()) == set(state["model"]) and "ddpm_fast_config" in f.metadata()
        ema = {k[7:]: v for k, v in state["ema"].items() if k.startswith("module.")}
        assert torch.equal(f.get_tensor("model.conv_in.weight"), ema["model.conv_in.weight"])
    main(["export", "--checkpoint", ckpt, "--out", str(tmp_path / "folder"), "--format", "diffusers"])
    # the run's noise schedule goes with it (it was dropped: sample --diffusers then ran T = 1000, linear, epsilon)
    _, kwargs = interop.load_diffusers(str(tmp_path / "folder"))
    assert kwargs == {"image_size": 8, "channels": 1, "timesteps": 20, "beta_schedule": "cosine",
                      "prediction_type": "v_prediction", "variance_type": "fixed_large", "beta_start": 1e-4,
                      "beta_end": 0.02}  # fmt: skip
    common = ["--n", "3", "--sampler", "ddim", "--steps", "4", "--device", "cpu", "--no-fused", "--seed", "3"]
    main(["sample", "--checkpoint", ckpt, "--out", str(tmp_path / "a.npz"), *common])
    main(["sample", "--diffusers", str(tmp_path / "folder"), "--out", str(tmp_path / "b.npz"), *common])
    import numpy as np

    a, b = (np.load(tmp_path / n)["arr_0"].astype(int) for n in ("a.npz", "b.npz"))
    assert np.abs(a - b).max() <= 1  # the same model either way (uint8 rounding)


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["sample", "--checkpoint", str(tmp_path / "none.pt")])
    assert e.value.code == 2
    assert "error: no checkpoint at" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--dataset", "cifar10", "--class", "plane", "--data-root", str(tmp_path)])
    assert "unknown CIFAR-10 class 'plane'; choose one of airplane" in capsys.readouterr().err


def test_resume_goes_on_with_the_checkpoints_run_and_refuses_a_contradiction_by_name(tmp_path, capsys):
    """--resume takes the model, schedule and data from the checkpoint: options left out follow
    it (a digits run at 8x8 resumes without --dataset / --image-size, whose defaults are other),
    and an option given that contradicts it is refused before any work, naming the option (they
    were silently ignored, or --image-size failed late). --class is CIFAR-10's alone."""
    out = str(tmp_path / "run")
    run = ["--batch-size", "16", "--sample-every", "0", "--num-workers", "0", "--no-fused", "--device", "cpu",
           "--out", out]  # fmt: skip
    main(["train", "--dataset", "digits", "--image-size", "8", "--preset", "demo", "--max-steps", "1",
          "--timesteps", "20", "--beta-schedule", "cosine", *run])  # fmt: skip
    capsys.readouterr()
    for option in (["--timesteps", "50"], ["--preset", "small"], ["--dataset", "cifar10"], ["--image-size", "16"],
                   ["--beta-schedule", "linear"], ["--prediction-type", "v_prediction"]):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            main(["train", "--resume", "--max-steps", "2", *option, *run])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"--resume: {option[0]} {option[1]} does not match" in err, (option, err)
    assert load_checkpoint(os.path.join(out, "checkpoint.pt"))["step"] == 1  # nothing ran
    main(["train", "--resume", "--max-steps", "2", "--timesteps", "20", "--preset", "demo", *run])
    state = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert state["step"] == 2 and state["config"]["model"]["ddpm"]["beta_schedule"] == "cosine"
    assert state["config"]["model"]["data"] == {"dataset": "digits", "class_name": None}
    with pytest.raises(SystemExit) as e:
        main(["train", "--dataset", "digits", "--class", "airplane", "--out", str(tmp_path / "b")])
    assert e.value.code == 2 and "--class picks one of CIFAR-10's classes; --dataset digits" in capsys.readouterr().err


def test_cli_recipes_are_recorded_and_sample_rebuilds_them(tmp_path, capsys):
    """--beta-schedule scaled_linear --beta-start/--beta-end --snr-gamma --ema-warmup: the run
    trains with them, the checkpoint records the DDPM's options so `sample` (DPM-Solver++ here)
    rebuilds the same schedule, and --resume refuses a contradicting --snr-gamma or --beta-end."""
    out = str(tmp_path / "run")
    common = ["--batch-size", "16", "--sample-every", "0", "--num-workers", "0", "--no-fused", "--device", "cpu",
              "--dataset", "digits", "--image-size", "8", "--preset", "demo", "--timesteps", "30"]  # fmt: skip
    run = [*common, "--out", out]
    main(["train", "--max-steps", "2", "--beta-schedule", "scaled_linear", "--beta-start", "0.00085", "--beta-end",
          "0.012", "--snr-gamma", "5", "--ema-warmup", "--ema-power", "0.75", *run])  # fmt: skip
    state = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    ddpm = state["config"]["model"]["ddpm"]
    assert (ddpm["beta_schedule"], ddpm["beta_start"], ddpm["beta_end"], ddpm["snr_gamma"]) == (
        "scaled_linear", 0.00085, 0.012, 5.0)  # fmt: skip
    expected = torch.linspace(0.00085**0.5, 0.012**0.5, 30, dtype=torch.float64) ** 2
    torch.testing.assert_close(state["model"]["betas"].double(), expected, rtol=1e-6, atol=0)
    assert state["config"]["train"]["ema_warmup"] and state["config"]["train"]["ema_power"] == 0.75
    capsys.readouterr()
    for option in (["--snr-gamma", "1.0"], ["--beta-end", "0.02"]):
        with pytest.raises(SystemExit) as e:
            main(["train", "--resume", "--max-steps", "3", *option, *run])
        assert e.value.code == 2 and f"--resume: {option[0]} {option[1]} does not match" in capsys.readouterr().err
    main(["sample", "--checkpoint", os.path.join(out, "checkpoint.pt"), "--n", "2", "--sampler", "dpm++", "--steps",
          "3", "--device", "cpu", "--no-fused", "--out", str(tmp_path / "s.npz")])  # fmt: skip
    import numpy as np

    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (2, 8, 8, 1)
    with pytest.raises(SystemExit) as e:
        main(["train", "--max-steps", "1", "--beta-schedule", "cosine", "--beta-end", "0.03", *common,
              "--out", str(tmp_path / "c")])  # fmt: skip
    assert e.value.code == 2 and "cosine has neither" in capsys.readouterr().err


def test_cli_learned_variance_trains_samples_and_exports(tmp_path):
    """--variance-type learned_range: the U-Net gets 2C output channels (recorded), the hybrid loss
    trains it, `sample` and a diffusers export (its scheduler says learned_range) read it back."""
    out = str(tmp_path / "run")
    main(["train", "--dataset", "digits", "--image-size", "8", "--preset", "demo", "--max-steps", "2",
          "--batch-size", "16", "--timesteps", "20", "--sample-every", "0", "--num-workers", "0", "--no-fused",
          "--beta-schedule", "cosine", "--variance-type", "learned_range", "--out", out,
          "--device", "cpu"])  # fmt: skip
    ckpt = os.path.join(out, "checkpoint.pt")
    state = load_checkpoint(ckpt)
    assert state["config"]["model"]["unet"]["out_channels"] == 2
    assert state["config"]["model"]["ddpm"]["variance_type"] == "learned_range"
    assert state["model"]["model.conv_out.weight"].shape[0] == 2
    main(["sample", "--checkpoint", ckpt, "--n", "2", "--device", "cpu", "--no-fused",
          "--out", str(tmp_path / "a.npz")])  # fmt: skip
    main(["export", "--checkpoint", ckpt, "--out", str(tmp_path / "folder"), "--format", "diffusers"])
    unet, kwargs = interop.load_diffusers(str(tmp_path / "folder"))
    assert kwargs["variance_type"] == "learned_range" and unet.config.out_channels == 2
    DDPM(unet, **kwargs)  # rebuilds
