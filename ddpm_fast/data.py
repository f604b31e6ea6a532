"""Data sets, as (image, label) pairs with images scaled to [-1, 1].

- `digits`: scikit-learn's 1,797 handwritten 8x8 digits, resized: built in, no download.
- `cifar10`: torchvision's CIFAR10, optionally one class (`airplane` or 0 ...), with the
  paper's random horizontal flips.
- `folder`: every image under a folder (recursively), resized and center-cropped, flipped.
"""

import os
import socket
import warnings

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, Subset, TensorDataset
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader

DATASETS = ("digits", "cifar10", "folder")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


DIGITS_TEST = 360  # the last 360 of the 1,797 digits: `split="test"`, held out from "train"


def digits_dataset(image_size: int = 16, split: str = "all") -> TensorDataset:
    """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels), resized bilinearly to
    image_size x image_size and scaled to [-1, 1]. No flips: digits are not symmetric.
    split: "all", "train" (the first 1,437) or "test" (the last 360, held out)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is in the dev extra
        raise ImportError("the digits data set needs scikit-learn: pip install scikit-learn") from e
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    if split not in ("all", "train", "test"):
        raise ValueError(f"split must be 'all', 'train' or 'test', got {split!r}")
    digits = load_digits()
    x = torch.from_numpy(digits.images).float().div(16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    y = torch.from_numpy(digits.target).long()
    keep = {"all": slice(None), "train": slice(None, -DIGITS_TEST), "test": slice(-DIGITS_TEST, None)}[split]
    return TensorDataset(x[keep].clamp(0, 1) * 2 - 1, y[keep])


def _to_model_range(image_size: int, flip: bool, crop: bool = False) -> transforms.Compose:
    steps = [transforms.Resize(image_size), transforms.CenterCrop(image_size)] if crop else []
    if flip:
        steps.append(transforms.RandomHorizontalFlip())
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(0.5, 0.5)])


def class_index(name_or_index) -> int:
    """A CIFAR-10 class by name (`airplane`) or index (0-9)."""
    text = str(name_or_index).strip().lower()
    if text.isdigit() and int(text) < len(CIFAR10_CLASSES):
        return int(text)
    if text in CIFAR10_CLASSES:
        return CIFAR10_CLASSES.index(text)
    raise ValueError(f"unknown CIFAR-10 class {name_or_index!r}; choose one of {', '.join(CIFAR10_CLASSES)} or 0-9")


def cifar10_dataset(root: str, class_name=None, train: bool = True, download: bool = False, flip: bool = True):
    """CIFAR-10 from `root` (the folder holding cifar-10-batches-py) through torchvision, at
    32x32, keeping one class when class_name is given. With download=True it fetches the
    archive (and fails within 30 s on a machine without a network instead of hanging)."""
    index = class_index(class_name) if class_name is not None else None
    old_timeout = socket.getdefaulttimeout()
    try:
        socket.setdefaulttimeout(30)
        data = datasets.CIFAR10(root, train=train, download=download, transform=_to_model_range(32, flip))
    except RuntimeError as e:
        raise FileNotFoundError(
            f"CIFAR-10 is not under {root!r} (no cifar-10-batches-py there, or it is corrupt); "
            "pass --download on a machine with internet access, or copy the extracted archive there"
        ) from e
    except OSError as e:  # URLError, timeouts: no network
        raise ConnectionError(f"downloading CIFAR-10 failed ({e}); this machine may have no internet access") from e
    finally:
        socket.setdefaulttimeout(old_timeout)
    if index is None:
        return data
    keep = [i for i, target in enumerate(data.targets) if target == index]
    return Subset(data, keep)


def readable_images(files: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(the files PIL can decode in full, [(file, reason)] for the others: truncated, corrupt,
    not an image). Decoding every file up front costs a pass over the folder (JPEGs are decoded
    at reduced size), and means a bad file never stops an epoch half-way."""
    good, bad = [], []
    for path in files:
        try:
            with Image.open(path) as image:
                image.draft("RGB", (64, 64))  # JPEG: decode at 1/2 .. 1/8 size; other formats ignore it
                image.load()
            good.append(path)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            bad.append((path, f"{type(e).__name__}: {e}"))
    return good, bad


class ImageFolderDataset(Dataset):
    """Every image file under `root` (any depth), resized and center-cropped to image_size,
    RGB (or greyscale with channels=1), label 0. With `verify` (default) every file is decoded
    once first, and those that cannot be are skipped with a warning that names them."""

    def __init__(self, root: str, image_size: int, channels: int = 3, flip: bool = True, verify: bool = True):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist")
        self.files = sorted(
            os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.lower().endswith(IMG_EXTENSIONS)
        )
        if not self.files:
            raise ValueError(f"no images ({', '.join(IMG_EXTENSIONS)}) under {root!r}")
        if verify:
            self.files, bad = readable_images(self.files)
            if bad:
                shown = "; ".join(f"{path} ({reason})" for path, reason in bad[:5])
                more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
                warnings.warn(f"skipping {len(bad)} unreadable image(s) under {root!r}: {shown}{more}", stacklevel=2)
            if not self.files:
                raise ValueError(f"none of the images under {root!r} can be read")
        self.mode = "L" if channels == 1 else "RGB"
        self.transform = _to_model_range(image_size, flip, crop=True)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        return self.transform(default_loader(self.files[i]).convert(self.mode)), 0


def make_dataset(name: str, image_size: int, root: str | None = None, class_name=None, download: bool = False,
                 channels: int = 3, split: str = "all") -> Dataset:  # fmt: skip
    """The data set a `ddpm-fast train` run names (`split` applies to the digits)."""
    if class_name is not None and name != "cifar10":
        raise ValueError(f"--class picks one of CIFAR-10's classes; --dataset {name} has none to pick")
    if name == "digits":
        return digits_dataset(image_size, split)
    if name == "cifar10":
        if image_size != 32:
            raise ValueError(f"CIFAR-10 images are 32x32; image_size must be 32, got {image_size}")
        return cifar10_dataset(root or "data", class_name, download=download)
    if name == "folder":
        if not root:
            raise ValueError("the folder data set needs --data-root, the folder holding the images")
        return ImageFolderDataset(root, image_size, channels)
    raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
