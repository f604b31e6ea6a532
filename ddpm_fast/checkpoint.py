"""Checkpoints: written to a temporary file and renamed, read with `weights_only=True`, and a
training run's whole state in and out of them.

A training checkpoint holds the model, the EMA, the optimizer, the learning-rate scheduler, the
GradScaler, the position in the epoch and every RNG state (`rng_state`), so that a resumed run
goes on exactly as if it had never stopped. `keep_copy` keeps the newest K copies of it as
checkpoints/step_NNNNNNN.pt (a hard link where the file system has them).
"""

import os
import shutil

import torch

from ddpm_fast import runs


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated or not one of ours."""


def save_checkpoint(state: dict, path: str) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a
    file, and a save that fails or is interrupted removes its temporary file (one killed outright
    leaves it to the next run's `runs.remove_stale_tmp`). A save that fails (a full disk, a folder
    gone read-only) raises CheckpointError saying that the checkpoint already there is intact."""
    try:
        runs.write_atomically(path, lambda tmp: torch.save(state, tmp))
    except Exception as e:  # torch.save reports a full disk as a RuntimeError ("file write failed")
        kept = f"the checkpoint already at {path!r} is intact" if os.path.isfile(path) else "none was there before"
        raise CheckpointError(f"could not write the checkpoint {path!r} ({type(e).__name__}: {e}); {kept}. "
                              "Free disk space (or fix the folder) and go on with --resume") from e  # fmt: skip


def load_checkpoint(path: str, map_location="cpu") -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path!r}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, foreign objects
        raise CheckpointError(f"checkpoint {path!r} is truncated or corrupt: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path!r} is not a ddpm-fast checkpoint (no model or config in it)")
    return state


def load_training_state(path: str, map_location="cpu") -> dict:
    """load_checkpoint, refusing a checkpoint that cannot go on training (weights only)."""
    state = load_checkpoint(path, map_location=map_location)
    if "ema" not in state or "optimizer" not in state:
        raise CheckpointError(f"{path!r} holds weights only (no EMA or optimizer state): it cannot be resumed")
    return state


def load_weights(module: torch.nn.Module, weights: dict, path: str) -> None:
    """module.load_state_dict(weights), or a CheckpointError naming `path` where the weights are
    another model's (a size mismatch, missing or unexpected keys) instead of torch's traceback."""
    try:
        module.load_state_dict(weights)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise CheckpointError(f"{path!r} holds the weights of another model than this one: {detail[:400]}") from None


def rng_state(generator: torch.Generator) -> dict:
    """Every RNG a training step draws from: torch's CPU and CUDA generators (dropout) and the
    run's own `generator` (t and the noise of the loss)."""
    return {
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "rng_train": generator.get_state(),
    }


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["rng_cpu"].cpu())
    if torch.cuda.is_available() and state["rng_cuda"]:
        torch.cuda.set_rng_state_all([s.cpu() for s in state["rng_cuda"]])
    generator.set_state(state["rng_train"].cpu())


def keep_copy(checkpoint_path: str, step: int, keep: int = 0) -> str:
    """The checkpoint at `checkpoint_path` as checkpoints/step_NNNNNNN.pt beside it (atomically),
    the newest `keep` of those kept (0: all); returns the copy's path."""
    folder = os.path.join(os.path.dirname(checkpoint_path), "checkpoints")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step_{step:07d}.pt")

    def link_or_copy(tmp):
        try:  # the same bytes, no second write (checkpoint.pt is replaced, not changed)
            os.link(checkpoint_path, tmp)
        except OSError:
            shutil.copyfile(checkpoint_path, tmp)

    runs.write_atomically(path, link_or_copy)
    if keep:
        kept = sorted(f for f in os.listdir(folder) if f.startswith("step_") and f.endswith(".pt"))
        for old in kept[:-keep]:
            os.remove(os.path.join(folder, old))
    return path
