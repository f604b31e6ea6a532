"""`ddpm-fast sample` for FID-sized runs: per-image seeds (the same images at any batch size and
process count), torchrun over two CPU processes (gloo), resume after a stopped run."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ddpm_fast import DDPM, UNet, UNetConfig, sampling
from ddpm_fast.cli import main

TINY = UNetConfig(in_channels=3, image_size=8, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                  num_groups=4, dropout=0.0)  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    main(["train", "--dataset", "digits", "--image-size", "8", "--preset", "demo", "--max-steps", "2",
          "--batch-size", "16", "--timesteps", "20", "--sample-every", "0", "--num-workers", "0", "--no-fused",
          "--beta-schedule", "cosine", "--out", str(out), "--device", "cpu"])  # fmt: skip
    return str(out / "checkpoint.pt")


def run_sample(checkpoint, out, *extra):
    main(["sample", "--checkpoint", checkpoint, "--device", "cpu", "--no-fused", "--out", str(out), *extra])
    return np.load(out)["arr_0"] if str(out).endswith(".npz") else None


@pytest.mark.parametrize("sampler", [["--sampler", "ddpm"], ["--sampler", "ddim", "--steps", "4", "--eta", "1"]])
def test_per_image_generators_give_each_image_whatever_its_batch(sampler):
    """A list of generators, one per image: image i is the same in a batch of 4, of 3 + 1, or alone."""
    torch.manual_seed(0)
    ddpm = DDPM(UNet(TINY), image_size=8, timesteps=10, beta_schedule="cosine").eval()
    gens = lambda idx: sampling.image_generators(7, idx, "cpu")  # noqa: E731
    run = ddpm.sample if sampler[1] == "ddpm" else (lambda n, **k: ddpm.ddim_sample(n, steps=4, eta=1.0, **k))
    together = run(4, generator=gens(range(4)), progress=False)
    apart = torch.cat([run(3, generator=gens([0, 1, 2]), progress=False), run(1, generator=gens([3]), progress=False)])
    torch.testing.assert_close(apart, together, rtol=0, atol=1e-6)
    assert not torch.allclose(together[0], together[1])
    with pytest.raises(ValueError, match="a list of 3 generators for a batch of 4"):
        run(4, generator=gens(range(3)), progress=False)
    with pytest.raises(ValueError, match="cuda_graph=True takes one generator"):
        ddpm.sample(2, generator=gens(range(2)), progress=False, cuda_graph=True)


@pytest.mark.slow
def test_one_process_gives_the_same_file_at_any_batch_size_and_two_torchrun_ranks_too(checkpoint, tmp_path):
    """--num-images 10: batches of 4 and of 3 on one process, and torchrun --nproc_per_node 2
    (gloo, each rank a strided half) write the same .npz; the parts folder is gone after."""
    a = run_sample(checkpoint, tmp_path / "a.npz", "--num-images", "10", "--batch-size", "4")
    b = run_sample(checkpoint, tmp_path / "b.npz", "--n", "10", "--batch-size", "3")
    assert a.shape == (10, 8, 8, 1) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not os.path.exists(str(tmp_path / "a.npz") + sampling.PARTS)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "ddpm_fast.cli", "sample", "--checkpoint", checkpoint, "--num-images", "10", "--batch-size", "2",
           "--device", "cpu", "--no-fused", "--out", str(tmp_path / "c.npz")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "10 samples (ddpm, 2 process(es))" in proc.stdout
    assert np.array_equal(np.load(tmp_path / "c.npz")["arr_0"], a)


def test_a_stopped_run_resumes_with_the_images_not_yet_on_disk(checkpoint, tmp_path, monkeypatch, capsys):
    """Stopped after its second batch, the run left those batches in OUT.parts; --resume samples
    only the rest and writes what an uninterrupted run writes. Without --resume the parts are
    not overwritten, and a resume with another seed is refused by name."""
    full = run_sample(checkpoint, tmp_path / "full.npz", "--num-images", "7", "--batch-size", "2")
    out = tmp_path / "s.npz"
    real, calls = sampling.Parts.write, []

    def stop_after_two(self, indices, images):
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C mid-run
        calls.append(list(indices))
        real(self, indices, images)

    monkeypatch.setattr(sampling.Parts, "write", stop_after_two)
    with pytest.raises(SystemExit) as e:
        run_sample(checkpoint, out, "--num-images", "7", "--batch-size", "2")
    assert e.value.code == 130 and not out.exists()
    monkeypatch.setattr(sampling.Parts, "write", lambda self, i, im: calls.append(list(i)) or real(self, i, im))
    with pytest.raises(SystemExit) as e:
        run_sample(checkpoint, out, "--num-images", "7")
    assert e.value.code == 2 and "holds 4 images of an earlier sampling run: pass --resume" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run_sample(checkpoint, out, "--num-images", "7", "--resume", "--seed", "1")
    assert e.value.code == 2 and "seed 1 (the run's: 0)" in capsys.readouterr().err
    calls.clear()
    resumed = run_sample(checkpoint, out, "--num-images", "7", "--batch-size", "5", "--resume")
    assert calls == [[4, 5, 6]] and np.array_equal(resumed, full)


def test_a_second_sample_into_the_same_out_is_refused_while_one_runs(checkpoint, tmp_path, capsys):
    """OUT.parts is locked by the run writing it: a second `sample --out` there is refused by name
    (it would race the first and remove its temporary files), and goes through once it is free."""
    out = tmp_path / "s.npz"
    running = sampling.Parts(str(out), {}, False, rank=0)  # a live run's rank 0
    try:
        with pytest.raises(SystemExit) as e:
            run_sample(checkpoint, out, "--num-images", "3")
        assert e.value.code == 2 and "is in use by another ddpm-fast run" in capsys.readouterr().err
    finally:
        running.release()
    assert run_sample(checkpoint, out, "--num-images", "3").shape[0] == 3


@pytest.mark.slow
def test_a_killed_process_resumes_to_the_uninterrupted_file(checkpoint, tmp_path):
    """SIGKILL mid-run (no handler runs): the finished batches stay in OUT.parts, a batch in flight
    leaves at most a temporary file, and --resume completes the same .npz as an uninterrupted run."""
    import signal
    import time

    full = run_sample(checkpoint, tmp_path / "full.npz", "--num-images", "24", "--batch-size", "2")
    out = tmp_path / "k.npz"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "ddpm_fast.cli", "sample", "--checkpoint", checkpoint, "--num-images", "24",
           "--batch-size", "1", "--device", "cpu", "--no-fused", "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = sampling.Parts(str(out), {}, True, rank=1)  # a reader (rank 1 prepares nothing)
    deadline = time.monotonic() + 120
    while proc.poll() is None and len(parts.files()) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    held = parts.count()
    assert 3 <= held < 24 and not out.exists(), held
    resumed = run_sample(checkpoint, out, "--num-images", "24", "--batch-size", "5", "--resume")
    assert np.array_equal(resumed, full)
    assert not os.path.exists(str(out) + sampling.PARTS)


@pytest.mark.slow
def test_fid_over_two_gloo_ranks_equals_one_process(tmp_path):
    """metrics.fid under torch.distributed: each rank takes every other batch and torchmetrics
    sums the float64 statistics over the ranks; both ranks get one process's value."""
    import ddp_worker
    import torch.multiprocessing as mp
    from test_train import free_port

    from ddpm_fast import metrics

    rng = np.random.default_rng(0)
    a, b = str(tmp_path / "a.npz"), str(tmp_path / "b.npz")
    np.savez(a, arr_0=rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8))
    np.savez(b, arr_0=(rng.integers(0, 200, (17, 8, 8, 3))).astype(np.uint8))
    one = metrics.fid(a, b, feature=ddp_worker.stand_in_feature(), batch_size=3)
    mp.spawn(ddp_worker.fid, args=(2, free_port(), a, b, str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"fid{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert [r["real_images"] for r in results] == [11, 9]  # 20 in batches of 3: 0, 2, 4, 6 (3+3+3+2); 1, 3, 5
    for r in results:
        assert r["fid"] == pytest.approx(one, rel=1e-6)
    assert one > 0
