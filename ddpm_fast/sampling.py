"""`ddpm-fast sample`: many images on one process or many (torchrun), each image reproducible on
its own, a stopped run resumable. As EDM's generate.py does it:

- image i draws x_T and all its step noise from its own generator, seeded from (--seed, i)
  (image_seed), so it is the same image whatever the batch size, the number of processes or the
  order (diffusers' convention: a list of generators, one per image; reference.randn);
- under torchrun each rank samples a strided subset of the indices (rank, rank + world, ...);
- each batch is written as it finishes to OUT.parts/ (its indices and uint8 NHWC images, to a
  temporary file then renamed), so a stopped run loses at most its batches in flight and
  `--resume` samples only the indices not on disk; OUT.parts/settings.json holds what fixes the
  images (model, sampler, steps, seed ...), and a resume with other settings is refused by name;
- at the end rank 0 merges the parts, in index order, into the one .npz (uint8 NHWC under arr_0)
  or image grid, and removes OUT.parts: one process writes the same file.
"""

import glob
import json
import os
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ddpm_fast import metrics, runs

PARTS = ".parts"  # OUT.parts: the batches sampled so far
_PART = re.compile(r"r(\d+)-(\d+)-n(\d+)\.npz$")


def image_seed(seed: int, index: int) -> int:
    """The seed of image `index`'s generator: (seed, index) as one 64-bit number."""
    return (seed * 2**32 + index) % 2**64


def image_generators(seed: int, indices, device) -> list[torch.Generator]:
    """One generator per image, seeded from (seed, its index)."""
    return [torch.Generator(device).manual_seed(image_seed(seed, int(i))) for i in indices]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1], (B, C, H, W), as uint8 NHWC (what FID evaluators read)."""
    return metrics.quantize(images).permute(0, 2, 3, 1).cpu().numpy()


class Parts:
    """OUT.parts/: one .npz per finished batch (`indices`, `images`), named r<rank>-<k>-n<count>.npz.
    Rank 0 locks the folder (runs.RunLock) until `release()`: a second `sample` into the same --out
    is refused by name instead of racing this one (and removing its temporary files)."""

    def __init__(self, out: str, settings: dict, resume: bool, rank: int):
        self.folder, self.rank = out + PARTS, rank
        self.settings_path = os.path.join(self.folder, "settings.json")
        self._next = None  # this rank's next part number, found on its first write
        self._lock = None
        if rank == 0:
            os.makedirs(self.folder, exist_ok=True)
            self._lock = runs.RunLock(self.folder, option="--out")
            try:
                self._prepare(settings, resume)
            except BaseException:
                self.release()
                raise

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _prepare(self, settings: dict, resume: bool) -> None:
        held = self.files()
        if held and not resume:
            raise runs.RunDirError(
                f"{self.folder} holds {self.count()} images of an earlier sampling run: pass --resume to go on "
                f"with it, or remove the folder to start over"
            )
        if resume and os.path.isfile(self.settings_path):
            with open(self.settings_path) as f:
                saved = json.load(f)
            differ = [k for k in sorted(set(saved) | set(settings)) if saved.get(k) != settings.get(k)]
            if differ:
                what = ", ".join(f"{k} {settings.get(k)!r} (the run's: {saved.get(k)!r})" for k in differ)
                raise ValueError(f"--resume: these settings differ from the run in {self.folder}: {what}")
        runs.remove_stale_tmp(self.folder)  # under the lock: no live writer owns them
        runs.write_atomically(self.settings_path, lambda tmp: _write_json(tmp, settings))

    def files(self) -> list[str]:
        return sorted(p for p in glob.glob(os.path.join(glob.escape(self.folder), "r*-*-n*.npz")) if _PART.search(p))

    def count(self) -> int:
        """Images on disk (from the file names: no file is read)."""
        return sum(int(_PART.search(p).group(3)) for p in self.files())

    def done(self) -> set[int]:
        found = set()
        for path in self.files():
            with np.load(path) as part:
                found.update(part["indices"].tolist())
        return found

    def write(self, indices: list[int], images: np.ndarray) -> None:
        if self._next is None:  # after the parts an earlier run of this rank left
            mine = [_PART.search(p) for p in self.files()]
            self._next = max([int(m.group(2)) + 1 for m in mine if m.group(1) == str(self.rank)], default=0)
        path = os.path.join(self.folder, f"r{self.rank}-{self._next:06d}-n{len(indices)}.npz")
        self._next += 1

        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, indices=np.asarray(indices, dtype=np.int64), images=images)

        runs.write_atomically(path, write)

    def merge(self, n: int) -> np.ndarray:
        """All n images in index order (refused by name if any is missing)."""
        images, have = None, np.zeros(n, dtype=bool)
        for path in self.files():
            with np.load(path) as part:
                idx, imgs = part["indices"], part["images"]
            if images is None:
                images = np.zeros((n, *imgs.shape[1:]), dtype=np.uint8)
            images[idx], have[idx] = imgs, True
        if images is None or not have.all():
            missing = int((~have).sum())
            raise RuntimeError(f"{self.folder}: {missing} of {n} images are missing; run again with --resume")
        return images


def _write_json(path: str, value: dict) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)


def sample_images(ddpm, n: int, args, device, draw, settings: dict, progress: bool = True) -> np.ndarray | None:
    """Sample images 0..n-1 over this process group (one process without torchrun) into
    args.out + ".parts", resuming from what is there with args.resume. `draw(batch, generators)`
    samples one batch in [-1, 1]. Returns the n images, uint8 NHWC in index order, on rank 0
    (None elsewhere) once every rank is done."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    parts = Parts(args.out, settings, args.resume, rank)
    try:
        return _sample_parts(parts, n, args, device, draw, rank, world, progress)
    finally:
        parts.release()


def _sample_parts(parts: Parts, n: int, args, device, draw, rank: int, world: int, progress: bool):
    if world > 1:
        dist.barrier()  # rank 0 has checked and made the folder
    done = parts.done() if args.resume else set()
    todo = [i for i in range(rank, n, world) if i not in done]
    bar = tqdm(total=n, initial=min(len(done), n), unit="img", desc="sampling", disable=rank != 0 or not progress)
    for start in range(0, len(todo), args.batch_size):
        indices = todo[start : start + args.batch_size]
        images = draw(len(indices), image_generators(args.seed, indices, device))
        parts.write(indices, to_uint8(images))
        bar.update(parts.count() - bar.n)  # every rank's finished batches: images/s over all ranks
    if world > 1:
        dist.barrier()
    bar.update(parts.count() - bar.n)
    bar.close()
    if rank != 0:
        return None
    return parts.merge(n)


def finish(out: str) -> None:
    """Remove OUT.parts once the merged file is written."""
    shutil.rmtree(out + PARTS, ignore_errors=True)
