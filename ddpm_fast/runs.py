"""Run control: output folders, locks, signals, and the checks a run makes before its expensive part.

- `prepare_run_dir`: an --out that already holds a run is never silently reused (--resume goes
  on, --overwrite starts over, anything else is refused); a lock file stops a second process
  writing into the same folder; temporary files a dead run left behind are removed.
- `check_output_file`: an output file's extension and that its folder can be written, before
  any sampling.
- `parse_device`: a --device that exists here.
- `StopSignals`: SIGINT and SIGTERM stop a run at its next step boundary, with a save.
"""

import glob
import os
import shutil
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

# What a run writes into its folder (and --overwrite removes; nothing else is touched).
RUN_FILES = ("checkpoint.pt", "loss.csv", "loss.png", "samples.png", "samples", "checkpoints", "fid.csv", "tb")
RUN_MARKERS = ("checkpoint.pt", "loss.csv")  # a folder with one of these holds a run
LOCK_NAME = ".ddpm-fast.lock"
TMP_PATTERN = "*.tmp.*"  # checkpoint.pt.tmp.<pid>: see checkpoint.save_checkpoint

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


class RunDirError(ValueError):
    """An output folder that cannot be used as asked (the message names the option)."""


def parse_device(text: str) -> torch.device:
    """A device string that names a device present here, or a ValueError naming --device."""
    try:
        device = torch.device(text)
    except RuntimeError as e:
        raise ValueError(f"--device {text!r} is not a device (cpu, cuda, cuda:1, mps): {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {text}: no CUDA GPU is visible here (torch.cuda.is_available() is False, "
                f"torch {torch.__version__}); use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {text}: MPS is not available here; use --device cpu")
    return device


def _check_writable_dir(path: str, option: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunDirError(f"{option} {path!r} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise RunDirError(f"{option} {path!r} cannot be written: {e.strerror or e}") from None


def check_output_file(path: str, extensions: tuple[str, ...], option: str = "--out") -> None:
    """`path` ends in one of `extensions` and its folder exists (or can be made) and is writable."""
    if not path.lower().endswith(extensions):
        raise RunDirError(f"{option} {path!r} must end in one of {', '.join(extensions)}")
    if os.path.isdir(path):
        raise RunDirError(f"{option} {path!r} is a folder, not a file")
    _check_writable_dir(os.path.dirname(os.path.abspath(path)), option)


class RunLock:
    """An exclusive lock on a run folder (fcntl.flock on OUT/.ddpm-fast.lock), held until
    `release()` or the end of the process; the kernel drops it when a process dies, so a
    crashed run never leaves a stale lock. Where flock does not exist (Windows) it is a no-op."""

    def __init__(self, folder: str, option: str = "--out"):
        self.path = os.path.join(folder, LOCK_NAME)
        self._file = open(self.path, "a+")
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "?"
            self._file.close()
            raise RunDirError(
                f"{option} {folder!r} is in use by another ddpm-fast run (pid {holder}); "
                "wait for it to finish or choose another --out"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(str(os.getpid()))
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            self._file.close()  # closing drops the flock


def write_atomically(path: str, write) -> None:
    """write(tmp) to `path`'s temporary name (PATH.tmp.<pid>, in the same folder), then rename it
    onto `path`: a crash never leaves half a file there, and a write that fails or is interrupted
    removes its temporary file (one killed outright leaves it to remove_stale_tmp)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def remove_stale_tmp(folder: str) -> list[str]:
    """Remove the temporary files (checkpoint.pt.tmp.<pid>) a killed run left in `folder`.
    Only call this while holding the folder's RunLock: then no live writer owns them."""
    removed = []
    for path in glob.glob(os.path.join(glob.escape(folder), TMP_PATTERN)):
        try:
            os.remove(path)
            removed.append(path)
        except OSError:
            pass
    return removed


def holds_run(folder: str) -> bool:
    return any(os.path.exists(os.path.join(folder, name)) for name in RUN_MARKERS)


def prepare_run_dir(folder: str, resume: bool = False, overwrite: bool = False, option: str = "--out") -> RunLock:
    """Make `folder` ready for a training run and lock it; returns the lock (keep it).

    Refuses, naming the option: a file or an unwritable place; a folder that holds a run when
    neither resume nor overwrite is given; resume without a checkpoint; both flags at once; a
    folder another run has locked. Removes the stale temporary files of a dead run, and with
    `overwrite` the previous run's files (RUN_FILES only)."""
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other: pass one")
    _check_writable_dir(folder, option)
    lock = RunLock(folder, option)
    try:
        for path in remove_stale_tmp(folder):
            print(f"removed {path}, left by a run that did not finish saving")
        checkpoint = os.path.join(folder, "checkpoint.pt")
        if resume and not os.path.isfile(checkpoint):
            raise RunDirError(f"--resume: there is no checkpoint in {option} {folder!r} ({checkpoint} is missing)")
        if not resume and holds_run(folder):
            if not overwrite:
                found = ", ".join(n for n in RUN_FILES if os.path.exists(os.path.join(folder, n)))
                raise RunDirError(
                    f"{option} {folder!r} already holds a run ({found}); "
                    f"pass --resume to go on from its checkpoint, --overwrite to start over, or choose a fresh {option}"
                )
            for name in RUN_FILES:
                path = os.path.join(folder, name)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
    except BaseException:
        lock.release()
        raise
    return lock


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT or SIGTERM. `saved`: whether the state at the step boundary
    was written to `path` (a second signal before the save began stops without saving).
    `exit_code` is the shell's convention, 128 + the signal number."""

    def __init__(self, signum: int, step: int, path: str, saved: bool):
        self.signum, self.step, self.path, self.saved = signum, step, path, saved
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        what = f"saved {path} at step {step}" if saved else f"stopped without saving; {path} is the last checkpoint"
        super().__init__(f"{name}: {what}")


class StopSampling(BaseException):
    """Raised by the signal handler to abandon a sample grid."""


class StopSignals:
    """While entered, SIGINT and SIGTERM set `requested` (the signal number), which the loop
    reads at each step boundary, instead of raising KeyboardInterrupt in the middle of a step.
    What a signal does depends on the phase the run is in (`during`):

    - "training": the step finishes, then the run saves and stops;
    - "sampling": the grid is not worth waiting for, StopSampling abandons it, then it saves;
    - "saving": the save (atomic) finishes, then the run stops.

    A second signal outside a save stops at once without saving (TrainingInterrupted, saved
    False; `step()` and `checkpoint_path` name what is kept). Handlers can only be installed
    from the main thread: elsewhere the defaults stay. `announce`: say so on stderr (rank 0)."""

    def __init__(self, checkpoint_path: str, step=lambda: 0, announce: bool = True):
        self.checkpoint_path, self.step, self.announce = checkpoint_path, step, announce
        self.requested: int | None = None
        self.phase = "training"
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        self.requested, self.phase = None, "training"
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
            for s in self._previous:
                signal.signal(s, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    @contextmanager
    def during(self, phase: str):
        """The run is in `phase` ("sampling", "saving") inside the block, back to training after."""
        self.phase = phase
        try:
            yield
        finally:
            self.phase = "training"

    def _on_signal(self, signum, frame) -> None:
        if self.requested is None:
            self.requested = signum
            if self.announce:
                tqdm.write(f"\n{signal.Signals(signum).name}: stopping at the end of this step and saving "
                           "(a second signal stops at once without saving)", file=sys.stderr)  # fmt: skip
            if self.phase == "sampling":
                raise StopSampling
        elif self.phase != "saving":
            raise TrainingInterrupted(signum, self.step(), self.checkpoint_path, saved=False)
        # a signal during the save: the save finishes, then the run stops
