"""Sample quality and the training loop's extras: the Frechet distance (against a closed form),
FID through image sources and the Trainer with a stand-in feature extractor, the demo's digits
classifier, gradient accumulation, step checkpoints, TensorBoard, DDPM options on the CLI."""

import copy
import os
import urllib.error

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import Subset

from ddpm_fast import DDPM, UNet, UNetConfig, metrics
from ddpm_fast.cli import _load_for_sampling, main
from ddpm_fast.data import digits_dataset
from ddpm_fast.train import TrainConfig, Trainer, load_checkpoint, train_step

TINY = UNetConfig(in_channels=1, image_size=8, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                  num_groups=4, dropout=0.0)  # fmt: skip
DATA = Subset(digits_dataset(8), range(64))


class Features(nn.Module):
    """A stand-in feature extractor: the input itself, flattened (float features in, as given)."""

    def __init__(self, d):
        super().__init__()
        self.num_features = d

    def forward(self, x):
        return x.reshape(x.shape[0], -1).double()


class ColourStats(nn.Module):
    """A stand-in for Inception on uint8 images: per-channel means and standard deviations."""

    num_features = 6

    def forward(self, x):
        x = x.double() / 255
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)


def closed_form(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_frechet_distance_matches_the_closed_form_on_known_gaussians():
    g = torch.Generator().manual_seed(0)
    d, n = 4, 40_000
    mu1, mu2 = torch.tensor([0.0, 1.0, -1.0, 2.0]), torch.tensor([0.5, 1.0, 0.0, 2.0])
    a = torch.randn(d, d, generator=g)
    s1, s2 = torch.diag(torch.tensor([1.0, 2.0, 0.5, 1.0])), a @ a.T / d + 0.1 * torch.eye(d)
    x = mu1 + torch.randn(n, d, generator=g) @ torch.linalg.cholesky(s1).T
    y = mu2 + torch.randn(n, d, generator=g) @ torch.linalg.cholesky(s2).T
    metric = metrics.frechet_metric(Features(d))
    metric.update(x, real=True)
    metric.update(y, real=False)
    value = float(metric.compute())
    # exactly the formula on the sample statistics, and close to the population value
    xs, ys = x.double().numpy(), y.double().numpy()
    sample = closed_form(xs.mean(0), np.cov(xs, rowvar=False), ys.mean(0), np.cov(ys, rowvar=False))
    assert value == pytest.approx(sample, rel=1e-6, abs=1e-9)
    population = closed_form(mu1.numpy(), s1.numpy(), mu2.numpy(), s2.numpy())
    assert value == pytest.approx(population, rel=0.05)
    same = metrics.frechet_metric(Features(d))
    same.update(x, real=True)
    same.update(x, real=False)
    assert abs(float(same.compute())) < 1e-6


def _write_images(folder, images):
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")


def test_fid_reads_npz_files_folders_and_data_sets_through_one_path(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, (40, 8, 8, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + 60, 0, 255).astype(np.uint8)
    np.savez(tmp_path / "a.npz", arr_0=a)
    np.savez(tmp_path / "b.npz", samples=b)  # the key of ddpm-fast before 0.2
    _write_images(tmp_path / "b", b)
    kw = dict(feature=ColourStats(), batch_size=16)
    assert abs(metrics.fid(str(tmp_path / "a.npz"), str(tmp_path / "a.npz"), **kw)) < 1e-8
    from_npz = metrics.fid(str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), **kw)
    from_folder = metrics.fid(str(tmp_path / "a.npz"), str(tmp_path / "b"), **kw)
    assert from_npz > 0.01 and from_folder == pytest.approx(from_npz, rel=1e-9)
    digits = metrics.fid("digits", str(tmp_path / "a.npz"), limit=40, **kw)
    assert digits > from_npz  # grey digits are far from random colours
    np.savez(tmp_path / "bad.npz", other=a)
    with pytest.raises(ValueError, match="no arr_0"):
        metrics.fid(str(tmp_path / "a.npz"), str(tmp_path / "bad.npz"), **kw)


def test_without_a_network_fid_fails_fast_naming_where_the_weights_go(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(url, dst, progress=True):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    np.savez(tmp_path / "a.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(SystemExit) as e:
        main(["fid", str(tmp_path / "a.npz"), str(tmp_path / "a.npz"), "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert metrics.INCEPTION_URL in err and str(tmp_path / "hub" / "checkpoints" / metrics.INCEPTION_FILE) in err
    with pytest.raises(FileNotFoundError, match="--inception-weights"):
        metrics.inception_weights(str(tmp_path / "missing.pth"))
    (tmp_path / "notes.txt").write_text("not weights")
    torch.save([1, 2], tmp_path / "list.pt")
    for name in ("notes.txt", "list.pt"):  # failed deep inside torchmetrics, after the work before it
        with pytest.raises(ValueError, match=f"--inception-weights .*{name}' (is not a weights file|holds no state)"):
            metrics.inception_weights(str(tmp_path / name))
    torch.save({"w": torch.zeros(1)}, tmp_path / "w.pt")
    assert metrics.inception_weights(str(tmp_path / "w.pt")) == str(tmp_path / "w.pt")
    # train --fid-every: refused before the first step (it trained a whole epoch, then failed and saved nothing)
    started = []
    monkeypatch.setattr(Trainer, "train", lambda self: started.append(1))
    with pytest.raises(SystemExit) as e:
        main(["train", "--dataset", "digits", "--image-size", "8", "--preset", "demo", "--fid-every", "1",
              "--out", str(tmp_path / "run"), "--device", "cpu", "--no-fused"])  # fmt: skip
    assert e.value.code == 2 and metrics.INCEPTION_URL in capsys.readouterr().err and not started


def test_the_trainer_computes_fid_into_fid_csv_and_tensorboard(tmp_path):
    torch.manual_seed(0)
    ddpm = DDPM(UNet(TINY), image_size=8, channels=1, timesteps=20)
    config = TrainConfig(out_dir=str(tmp_path), epochs=2, batch_size=16, warmup=1, sample_every=1, num_samples=4,
                         sample_steps=2, progress=False, fid_every=1, fid_samples=32, tensorboard=True)  # fmt: skip
    Trainer(ddpm, DATA, config, "cpu", fid_feature=ColourStats()).train()
    rows = (tmp_path / "fid.csv").read_text().splitlines()
    assert rows[0] == "step,epoch,fid,samples" and [r.split(",")[:2] for r in rows[1:]] == [["4", "1"], ["8", "2"]]
    assert all(float(r.split(",")[2]) > 0 for r in rows[1:])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"loss", "lr", "fid"} <= set(events.Tags()["scalars"]) and "samples" in events.Tags()["images"]
    assert [e.step for e in events.Scalars("loss")] == list(range(1, 9))


def test_grad_accum_equals_a_batch_that_many_times_larger():
    torch.manual_seed(0)
    big = DDPM(UNet(TINY), image_size=8, channels=1, timesteps=50)
    small = copy.deepcopy(big)
    initial = copy.deepcopy(big.state_dict())
    x0 = digits_dataset(8).tensors[0][:32]
    # SGD: the update is linear in the gradient, so the two runs' float rounding stays rounding-sized
    # (Adam's first step is about lr * sign(g): a weight whose gradient is ~0 moves by +-lr either way)
    opts = [torch.optim.SGD(m.parameters(), lr=0.2) for m in (big, small)]
    for step in range(2):
        gens = [torch.Generator().manual_seed(step) for _ in range(2)]
        loss_big = train_step(big, x0, opts[0], 1.0, generator=gens[0])
        loss_small = train_step(small, x0, opts[1], 1.0, generator=gens[1], grad_accum=4)
        torch.testing.assert_close(loss_small, loss_big, rtol=1e-5, atol=1e-6)  # float32 sums in another order
    moved = 0
    for (name, a), b in zip(big.named_parameters(), small.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
        moved += bool((a - initial[name]).abs().max() > 1e-4)
    # the steps changed the model (its zero-initialised layers shield the others at first)
    assert moved > len(list(big.parameters())) / 4
    with pytest.raises(ValueError, match="grad_accum=3"):
        train_step(small, x0, opts[1], grad_accum=3)


def test_trainer_with_grad_accum_steps_over_the_larger_batch(tmp_path):
    torch.manual_seed(0)
    ddpm = DDPM(UNet(TINY), image_size=8, channels=1, timesteps=20)
    config = TrainConfig(out_dir=str(tmp_path), epochs=1, batch_size=8, grad_accum=2, warmup=1, sample_every=0,
                         progress=False, tensorboard=False)  # fmt: skip
    assert [s for s, _ in Trainer(ddpm, DATA, config, "cpu").train()] == [1, 2, 3, 4]  # 64 images, 16 a step


def test_save_every_keeps_the_newest_k_step_checkpoints(tmp_path):
    torch.manual_seed(0)
    ddpm = DDPM(UNet(TINY), image_size=8, channels=1, timesteps=20)
    config = TrainConfig(out_dir=str(tmp_path), epochs=3, batch_size=16, warmup=1, sample_every=0, progress=False,
                         save_every=2, keep=2, tensorboard=False)  # fmt: skip
    Trainer(ddpm, DATA, config, "cpu").train()
    kept = sorted(os.listdir(tmp_path / "checkpoints"))
    assert kept == ["step_0000010.pt", "step_0000012.pt"]
    state = load_checkpoint(str(tmp_path / "checkpoints" / kept[0]))
    assert state["step"] == 10 and state["epoch"] == 2 and state["batch_in_epoch"] == 2
    assert load_checkpoint(str(tmp_path / "checkpoint.pt"))["step"] == 12


def test_ddpm_options_on_the_cli_are_recorded_and_rebuilt_by_sample(tmp_path, capsys):
    out = tmp_path / "run"
    main(["train", "--out", str(out), "--preset", "demo", "--image-size", "8", "--batch-size", "16", "--max-steps",
          "2", "--warmup", "1", "--sample-every", "0", "--num-workers", "0", "--device", "cpu", "--no-fused",
          "--timesteps", "50", "--beta-schedule", "cosine", "--prediction-type", "v_prediction",
          "--variance-type", "fixed_large", "--no-tensorboard"])  # fmt: skip
    ddpm = _load_for_sampling(str(out / "checkpoint.pt"), False, torch.device("cpu"))
    assert (ddpm.num_timesteps, ddpm.beta_schedule, ddpm.prediction_type, ddpm.variance_type) == (
        50, "cosine", "v_prediction", "fixed_large")  # fmt: skip
    main(["sample", "--checkpoint", str(out / "checkpoint.pt"), "--n", "2", "--out", str(tmp_path / "s.png"),
          "--device", "cpu", "--no-fused"])  # fmt: skip
    assert os.path.getsize(tmp_path / "s.png") > 0


def test_the_digits_classifier_separates_real_digits_from_noise():
    train_x, train_y = digits_dataset(8, "train").tensors
    test_x, test_y = digits_dataset(8, "test").tensors
    assert len(train_x) == 1437 and len(test_x) == 360
    net = metrics.train_digits_features(train_x, train_y, epochs=10)
    assert (net.logits(test_x).argmax(1) == test_y).float().mean() > 0.9
    real = metrics.frechet_distance(net, test_x, train_x[:360])
    noise = metrics.frechet_distance(net, test_x, torch.rand(360, 1, 8, 8) * 2 - 1)
    assert real * 10 < noise


@pytest.mark.slow
def test_the_demo_prints_its_frechet_distance(tmp_path, capsys):
    main(["demo", "--out", str(tmp_path / "demo"), "--steps", "2", "--sample-steps", "2", "--num-samples", "4",
          "--device", "cpu", "--no-fused"])  # fmt: skip
    out = capsys.readouterr().out
    assert "Frechet distance to the 360 held-out digits" in out and "real training digits" in out
