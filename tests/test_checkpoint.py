"""ddpm_fast.checkpoint: atomic saves, clear errors for bad files, a run's RNG state and kept copies."""

import os

import pytest
import torch
from test_train import trainer

from ddpm_fast.checkpoint import (
    CheckpointError,
    keep_copy,
    load_checkpoint,
    load_training_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def test_bad_checkpoints_give_clear_errors(tmp_path):
    t = trainer(tmp_path, max_steps=1)
    t.train()
    path = tmp_path / "checkpoint.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        t.resume()
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        t.resume(str(tmp_path / "missing.pt"))
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a ddpm-fast checkpoint"):
        load_checkpoint(str(tmp_path / "other.pt"))


def test_a_save_that_fails_or_is_interrupted_leaves_no_temporary_file(tmp_path, monkeypatch):
    def interrupted_save(obj, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"a": 1}, str(tmp_path / "checkpoint.pt"))
    assert os.listdir(tmp_path) == []


def test_a_weights_only_checkpoint_is_refused_for_training(tmp_path):
    path = str(tmp_path / "w.pt")
    save_checkpoint({"model": {}, "config": {}}, path)
    assert load_checkpoint(path) == {"model": {}, "config": {}}
    with pytest.raises(CheckpointError, match="holds weights only .*cannot be resumed"):
        load_training_state(path)


def test_the_rng_state_goes_back_to_where_it_was_saved():
    generator = torch.Generator().manual_seed(3)
    state = rng_state(generator)
    first = torch.rand(4), torch.rand(4, generator=generator)
    torch.rand(7), torch.rand(7, generator=generator)
    set_rng_state(state, generator)
    again = torch.rand(4), torch.rand(4, generator=generator)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_keep_copy_keeps_the_newest_k_as_the_same_bytes(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    for step in (1, 2, 3):
        save_checkpoint({"model": {}, "config": {}, "step": step}, path)
        kept = keep_copy(path, step, keep=2)
        assert open(kept, "rb").read() == open(path, "rb").read()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_0000002.pt", "step_0000003.pt"]
    assert load_checkpoint(str(tmp_path / "checkpoints" / "step_0000003.pt"))["step"] == 3
