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
