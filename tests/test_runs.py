"""Runs that lose nothing and fail early: output folders, locks, signals sent to a real process,
exact resume, corrupt images, non-finite losses, option ranges, batch 0, half images, warnings."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset, TensorDataset

import ddpm_fast.train as train_module
from ddpm_fast import DDPM, FastDDPM, UNet, UNetConfig, diffusion, kernels, runs
from ddpm_fast.cli import main
from ddpm_fast.data import ImageFolderDataset, digits_dataset
from ddpm_fast.kernels import _common as common
from ddpm_fast.train import (
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    TrainingInterrupted,
    load_checkpoint,
    save_checkpoint,
)

TINY = UNetConfig(in_channels=1, image_size=8, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                  num_groups=4, dropout=0.1)  # fmt: skip
DATA = Subset(digits_dataset(8), range(64))  # 4 batches of 16 per epoch
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def trainer(out, data=DATA, **overrides) -> Trainer:
    torch.manual_seed(0)
    ddpm = DDPM(UNet(TINY), image_size=8, channels=1, timesteps=20)
    kwargs = dict(out_dir=str(out), epochs=2, batch_size=16, warmup=3, sample_every=1, num_samples=4,
                  sample_steps=3, progress=False, lr=1e-3, ema_decay=0.9, log_every=3)  # fmt: skip
    return Trainer(ddpm, data, TrainConfig(**{**kwargs, **overrides}), "cpu", {"unet": {}, "ddpm": {}})


def cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


# -- output folders ----------------------------------------------------------------------------


def test_a_folder_that_holds_a_run_is_refused_unless_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    runs.prepare_run_dir(str(out)).release()  # a fresh folder: fine
    (out / "loss.csv").write_text("step,epoch,loss,lr\n1,0,0.5,1e-4\n")
    with pytest.raises(runs.RunDirError, match="already holds a run .*--resume.*--overwrite.*fresh --out"):
        runs.prepare_run_dir(str(out))
    with pytest.raises(runs.RunDirError, match="--resume: there is no checkpoint"):
        runs.prepare_run_dir(str(out), resume=True)
    with pytest.raises(runs.RunDirError, match="contradict"):
        runs.prepare_run_dir(str(out), resume=True, overwrite=True)
    (out / "samples").mkdir()
    (out / "notes.txt").write_text("mine")
    runs.prepare_run_dir(str(out), overwrite=True).release()
    assert sorted(os.listdir(out)) == [runs.LOCK_NAME, "notes.txt"]  # only the run's own files went


def test_bad_out_places_are_refused_before_any_work(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert "--out" in cli_error(["train", "--out", str(a_file), "--max-steps", "1"], capsys)
    assert "is a file, not a folder" in cli_error(["demo", "--out", str(a_file)], capsys)
    err = cli_error(["sample", "--checkpoint", "none.pt", "--out", str(tmp_path / "x.txt")], capsys)
    assert "--out" in err and ".npz" in err  # refused before even looking for the checkpoint
    err = cli_error(["export", "--checkpoint", "none.pt", "--out", str(tmp_path / "w.bin")], capsys)
    assert ".safetensors" in err
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        assert "cannot be written" in cli_error(["train", "--out", str(ro / "run")], capsys)


def test_a_second_run_into_a_locked_folder_is_refused(tmp_path):
    lock = runs.prepare_run_dir(str(tmp_path))
    with pytest.raises(runs.RunDirError, match=rf"in use by another ddpm-fast run \(pid {os.getpid()}\)"):
        runs.prepare_run_dir(str(tmp_path))
    lock.release()
    runs.prepare_run_dir(str(tmp_path)).release()  # free again once released


def test_stale_temporary_files_of_a_dead_run_are_removed(tmp_path, capsys):
    stale = tmp_path / "checkpoint.pt.tmp.999999"
    stale.write_bytes(b"half a checkpoint")
    runs.prepare_run_dir(str(tmp_path)).release()
    assert not stale.exists() and "removed" in capsys.readouterr().out


# -- option ranges and devices -----------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, option",
    [
        (["train", "--lr=-1e-3"], "--lr"),
        (["train", "--lr", "0"], "--lr"),
        (["train", "--lr", "nan"], "--lr"),
        (["train", "--warmup", "-1"], "--warmup"),
        (["train", "--sample-every", "-2"], "--sample-every"),
        (["train", "--ema-decay", "1"], "--ema-decay"),
        (["train", "--num-workers", "-1"], "--num-workers"),
        (["train", "--dropout", "1.5"], "--dropout"),
        (["train", "--batch-size", "0"], "--batch-size"),
        (["demo", "--lr", "-1"], "--lr"),
        (["demo", "--sample-steps", "5000"], "--sample-steps"),  # refused after training, before
        (["sample", "--checkpoint", "c.pt", "--eta", "2"], "--eta"),
        (["train", "--device", "cuda:7" if torch.cuda.is_available() else "cuda"], "--device"),
        (["train", "--device", "gpu"], "--device"),
    ],
)
def test_out_of_range_options_are_refused_by_name(argv, option, capsys):
    err = cli_error(argv, capsys)
    assert f"argument {option}:" in err, err


def test_train_config_checks_its_values():
    for bad in (dict(lr=0.0), dict(warmup=-1), dict(sample_every=-1), dict(num_workers=-1), dict(max_steps=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(**bad)


def test_train_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: 0.0002)", "(default: 5000)", "(default: 0.9999)", "(default: cifar10)"):
        assert default in text


def test_the_cli_says_when_a_cpu_run_will_not_give_samples(tmp_path, capsys):
    main(["train", "--out", str(tmp_path / "r"), "--preset", "cifar10", "--image-size", "8", "--max-steps", "1",
          "--batch-size", "2", "--sample-every", "0", "--num-workers", "0", "--device", "cpu",
          "--no-fused"])  # fmt: skip
    out = capsys.readouterr().out
    assert "takes many seconds per step on a CPU" in out and "ddpm-fast demo" in out
    assert "--warmup 5000 is longer than this run (1 steps)" in out


# -- data ----------------------------------------------------------------------------------------


def test_corrupt_images_are_skipped_with_a_warning_naming_them(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "big.jpg")
    full = (tmp_path / "big.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    with pytest.warns(UserWarning, match=r"skipping 2 unreadable image\(s\).*(garbage\.png.*truncated\.jpg)"):
        data = ImageFolderDataset(str(tmp_path), 8)
    assert len(data) == 7 and data[6][0].shape == (3, 8, 8)
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "bad.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="none of the images"), pytest.warns(UserWarning):
        ImageFolderDataset(str(tmp_path / "only"), 8)


# -- non-finite losses -------------------------------------------------------------------------


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    t = trainer(tmp_path, max_steps=4)  # one epoch, saved
    t.train()
    saved = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    t.config.max_steps = 8
    with torch.no_grad():
        t.ddpm.model.conv_in.weight.fill_(float("nan"))  # what --lr 1e9 does after a few steps
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 5 .*checkpoint.pt \(step 4\) is the last good"):
        t.train()
    again = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert again["step"] == 4 and torch.equal(again["model"]["model.conv_in.weight"],
                                              saved["model"]["model.conv_in.weight"])  # fmt: skip


def test_a_diverged_run_with_a_finite_loss_stops_as_a_non_finite_one(tmp_path):
    """--lr 1e9: gradient clipping keeps the loss finite (4e22) while the weights blow up, and the
    run used to end "done", exit 0, with weights of 6e9. A loss DIVERGED_FACTOR times its running
    mean stops it, naming the step and the last good checkpoint, without saving."""
    t = trainer(tmp_path, lr=1e9, warmup=0, max_steps=12)
    with pytest.raises(train_module.DivergedError, match=r"loss jumped to .* at step \d+ .*running mean .*"
                                                       r"no checkpoint had been written yet"):  # fmt: skip
        t.train()
    assert not os.path.exists(tmp_path / "checkpoint.pt")


def test_nan_images_stop_at_the_first_step_without_a_checkpoint(tmp_path):
    x = torch.full((32, 1, 8, 8), float("nan"))
    t = trainer(tmp_path, data=TensorDataset(x, torch.zeros(32)))
    with pytest.raises(NonFiniteLossError, match="at step 1 .*no checkpoint had been written yet"):
        t.train()
    assert not os.path.exists(tmp_path / "checkpoint.pt")


def test_fp16_skips_non_finite_steps_as_grad_scaler_does_then_stops(tmp_path, capsys):
    t = trainer(tmp_path, amp="fp16", max_steps=40, epochs=20)
    with torch.no_grad():
        t.ddpm.model.conv_in.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="10 steps in a row .*GradScaler skipped them"):
        t.train()
    assert t.skipped_steps == 10 and "GradScaler skipped the step" in capsys.readouterr().err


# -- the library API -----------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [DDPM, FastDDPM])
def test_batch_zero_is_refused_by_name(cls):
    ddpm = cls(UNet(TINY), image_size=8, channels=1, timesteps=20)
    with pytest.raises(ValueError, match="x0 is an empty batch"):
        ddpm.loss(torch.empty(0, 1, 8, 8))
    with pytest.raises(ValueError, match="x_t is an empty batch"):
        ddpm.p_sample(torch.empty(0, 1, 8, 8), torch.empty(0, dtype=torch.long))
    with pytest.raises(ValueError, match="n must be a positive int"):
        ddpm.sample(0)


def test_the_kernels_take_an_empty_batch():
    x = torch.randn(0, 4, 6, 6, requires_grad=True)
    w, b = torch.ones(4, requires_grad=True), torch.zeros(4, requires_grad=True)
    y = kernels.group_norm_silu(x, 2, w, b)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros(4))
    s = torch.rand(10)
    t = torch.zeros(0, dtype=torch.long)
    assert kernels.q_sample(x.detach(), t, x.detach(), s, s).shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_images_work_with_a_float32_model(dtype):
    ddpm = DDPM(UNet(TINY), image_size=8, channels=1, timesteps=20)
    x0, t, noise = torch.randn(2, 1, 8, 8).to(dtype), torch.tensor([3, 7]), torch.randn(2, 1, 8, 8)
    ddpm.eval()
    half_noise = noise.to(dtype)
    assert torch.equal(ddpm.loss(x0, t=t, noise=half_noise), ddpm.loss(x0.float(), t=t, noise=half_noise.float()))
    assert ddpm.p_sample(x0, t, noise=noise).dtype == torch.float32


def test_the_fallback_warning_is_once_per_process_attributed_to_the_caller_and_silenceable(monkeypatch):
    monkeypatch.setattr(common, "INTERPRET", False)
    monkeypatch.delenv("DDPM_FAST_KERNELS", raising=False)
    monkeypatch.setattr(diffusion, "_WARNED", set())
    x0, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):  # two models (a Trainer's EMA copy is a second one): still one warning
            FastDDPM(UNet(TINY), image_size=8, channels=1, timesteps=20, beta_schedule="cosine").loss(x0, t=t)
    assert len(record) == 1 and record[0].filename == __file__, [(w.filename, w.message) for w in record]
    monkeypatch.setattr(diffusion, "_WARNED", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=".*fused kernels do not run")
        FastDDPM(UNet(TINY), image_size=8, channels=1, timesteps=20, beta_schedule="cosine").loss(x0, t=t)


def test_the_cli_says_once_before_any_bar_that_it_runs_eager_and_warns_nothing(tmp_path):
    """Where the kernels cannot run, `ddpm-fast` says so in one line of its own before training
    (a FastDDPM's warning came from inside the first step: attributed to the console script and
    drawn into the progress bar), and runs the eager path: no warning at all."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "DDPM_FAST_KERNELS": "auto"}
    env.pop("PYTHONWARNINGS", None)
    cmd = [sys.executable, "-m", "ddpm_fast.cli", "train", "--out", str(tmp_path / "a"), "--preset", "demo",
           "--image-size", "8", "--batch-size", "16", "--max-steps", "2", "--warmup", "1", "--sample-every",
           "1", "--num-samples", "2", "--sample-steps", "2", "--epochs", "1", "--num-workers", "0",
           "--device", "cpu"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == ("train: no Triton kernels on cpu here (DDPM_FAST_KERNELS=auto, Triton interpreter off); "
                        "the eager PyTorch path (same results)"), lines  # fmt: skip
    assert ", eager;" in lines[1] and "Warning" not in done.stderr, done.stderr


# -- signals sent to a real training process ---------------------------------------------------

STEPS = 45  # batch 64: 28 steps per epoch, so a run crosses an epoch end (and writes a grid)


def _train_cmd(out, *extra):
    return [sys.executable, "-m", "ddpm_fast.cli", "train", "--out", str(out), "--preset", "demo", "--image-size", "8",
            "--batch-size", "64", "--epochs", "2", "--max-steps", str(STEPS), "--warmup", "10", "--sample-every", "1",
            "--num-samples", "4", "--sample-steps", "2", "--num-workers", "0", "--no-fused", "--seed", "3",
            "--device", "cpu", *extra]  # fmt: skip


class _Run:
    """A `ddpm-fast train` subprocess whose progress (tqdm's step counter on stderr) is followed."""

    def __init__(self, cmd):
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "TQDM_MININTERVAL": "0"})  # fmt: skip
        self.err, self.out = [], []
        self._threads = [threading.Thread(target=self._drain, args=(s, b), daemon=True)
                         for s, b in ((self.proc.stderr, self.err), (self.proc.stdout, self.out))]  # fmt: skip
        for th in self._threads:
            th.start()

    def _drain(self, stream, buf):
        while chunk := stream.read(64):
            buf.append(chunk)

    def step(self) -> int:
        """Steps shown so far (over both epochs)."""
        text = "".join(self.err)
        done = [int(m.group(1)) * 28 + int(m.group(2)) - 28 for m in re.finditer(r"epoch (\d)/2:.*?(\d+)/28", text)]
        return max(done, default=0)

    def wait(self, timeout=180):
        rc = self.proc.wait(timeout)
        for th in self._threads:
            th.join(5)
        return rc, "".join(self.out), "".join(self.err)


def _weights(path):
    state = load_checkpoint(str(path))
    return state, {k: v for k, v in state["model"].items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    rc, _, err = _Run(_train_cmd(out)).wait()
    assert rc == 0, err[-2000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "signals, at",
    [((signal.SIGINT,), 4), ((signal.SIGTERM,), 18), ((signal.SIGTERM,), 33)],
    ids=["sigint-epoch1", "sigterm-epoch1", "sigterm-epoch2"],
)
def test_a_signal_saves_at_a_step_boundary_and_resume_is_bit_exact(tmp_path, uninterrupted, signals, at):
    out = tmp_path / "run"
    run = _Run(_train_cmd(out))
    deadline = time.monotonic() + 120
    while run.step() < at and run.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    for s in signals:
        run.proc.send_signal(s)
    rc, _, err = run.wait()
    assert rc == 128 + signals[-1], err[-2000:]
    assert "--resume" in err and "go on with" in err
    state, _ = _weights(out / "checkpoint.pt")
    assert at <= state["step"] < STEPS and not [n for n in os.listdir(out) if ".tmp." in n]
    rc, _, err = _Run(_train_cmd(out, "--resume")).wait()
    assert rc == 0, err[-2000:]
    final, weights = _weights(out / "checkpoint.pt")
    ref, ref_weights = _weights(uninterrupted / "checkpoint.pt")
    assert final["step"] == ref["step"] == STEPS
    for name, value in ref_weights.items():
        assert torch.equal(weights[name], value), name  # bit for bit
    assert (out / "loss.csv").read_text() == (uninterrupted / "loss.csv").read_text()


@pytest.mark.slow
def test_a_second_signal_stops_at_once_and_leaves_no_orphan_file(tmp_path):
    out = tmp_path / "run"
    run = _Run(_train_cmd(out))
    while run.step() < 3 and run.proc.poll() is None:
        time.sleep(0.02)
    run.proc.send_signal(signal.SIGINT)
    run.proc.send_signal(signal.SIGINT)
    rc, _, err = run.wait()
    assert rc == 130, err[-2000:]
    assert not [n for n in os.listdir(out) if ".tmp." in n]
    if os.path.exists(out / "checkpoint.pt"):  # the save had begun and finished: it is whole
        load_checkpoint(str(out / "checkpoint.pt"))


def test_a_signal_in_process_stops_at_the_step_boundary(tmp_path, monkeypatch):
    straight = trainer(tmp_path / "a").train()
    real, calls = train_module.train_step, []

    def signalled(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            os.kill(os.getpid(), signal.SIGINT)  # arrives inside the step: the step still completes
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", signalled)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as e:
        trainer(tmp_path / "b").train()
    assert e.value.saved and e.value.step == 6 and e.value.exit_code == 130
    monkeypatch.setattr(train_module, "train_step", real)
    assert load_checkpoint(str(tmp_path / "b" / "checkpoint.pt"))["step"] == 6
    t = trainer(tmp_path / "b")
    t.resume()
    assert t.train() == straight[6:]
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are put back


# -- checkpoints that are not what a command needs ----------------------------------------------


def test_checkpoint_problems_are_one_clear_line_and_our_safetensors_export_samples(tmp_path, capsys, monkeypatch):
    """An export (.safetensors) samples like its checkpoint; a checkpoint without EMA weights, with
    another model's weights, a foreign .safetensors, an export into a place that cannot hold a
    folder, a batch too big for memory and a save onto a full disk each give one line naming the
    problem, not a traceback."""
    from safetensors.torch import save_file

    out = tmp_path / "run"
    main(["train", "--dataset", "digits", "--image-size", "8", "--preset", "demo", "--max-steps", "1",
          "--batch-size", "16", "--timesteps", "20", "--sample-every", "0", "--num-workers", "0", "--no-fused",
          "--out", str(out), "--device", "cpu"])  # fmt: skip
    ckpt = str(out / "checkpoint.pt")
    common = ["--n", "2", "--sampler", "ddim", "--steps", "3", "--device", "cpu", "--no-fused", "--seed", "1"]
    main(["export", "--checkpoint", ckpt, "--out", str(tmp_path / "w.safetensors")])
    main(["sample", "--checkpoint", str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "a.npz"), *common])
    main(["sample", "--checkpoint", ckpt, "--out", str(tmp_path / "b.npz"), *common])
    assert np.array_equal(np.load(tmp_path / "a.npz")["arr_0"], np.load(tmp_path / "b.npz")["arr_0"])
    capsys.readouterr()

    state = load_checkpoint(ckpt)
    del state["ema"]
    torch.save(state, tmp_path / "no_ema.pt")
    err = cli_error(["sample", "--checkpoint", str(tmp_path / "no_ema.pt"), *common], capsys)
    assert "holds no EMA weights ('ema'); --no-ema uses its raw weights" in err
    state = load_checkpoint(ckpt)
    state["config"]["model"]["unet"]["ch"] = 64
    torch.save(state, tmp_path / "other.pt")
    err = cli_error(["sample", "--checkpoint", str(tmp_path / "other.pt"), *common], capsys)
    assert "holds the weights of another model than this one: " in err and "size mismatch" in err
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    err = cli_error(["sample", "--checkpoint", str(tmp_path / "foreign.safetensors"), *common], capsys)
    assert "is not a ddpm-fast export (no ddpm_fast_config in its metadata)" in err and "--diffusers" in err
    (tmp_path / "a_file").write_text("")
    err = cli_error(["export", "--checkpoint", ckpt, "--out", str(tmp_path / "a_file" / "folder"), "--format",
                     "diffusers"], capsys)  # fmt: skip
    assert err.startswith("ddpm-fast export: error: ") and "Traceback" not in err

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 48.00 GiB")

    monkeypatch.setattr(DDPM, "ddim_sample", out_of_memory)
    err = cli_error(["sample", "--checkpoint", ckpt, "--out", str(tmp_path / "c.npz"), *common], capsys)
    assert "--batch-size 256: a batch of 2 images does not fit in cpu's memory" in err and "smaller" in err

    before = (out / "checkpoint.pt").read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        open(f, "wb").write(b"half")  # noqa: SIM115
        raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(torch, "save", full_disk)
    expected = r"could not write the checkpoint .*checkpoint.pt'.*PytorchStreamWriter.*already at .* is intact"
    with pytest.raises(train_module.CheckpointError, match=expected):
        save_checkpoint(load_checkpoint(ckpt), ckpt)
    assert (out / "checkpoint.pt").read_bytes() == before and not [n for n in os.listdir(out) if ".tmp." in n]
