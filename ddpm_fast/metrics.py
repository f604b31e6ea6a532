"""Sample quality as a number: FID and Inception Score through torchmetrics, and a Frechet
distance in the feature space of a small digits classifier for the demo.

Why torchmetrics (FrechetInceptionDistance, InceptionScore): it is maintained, it streams
(features are summed batch by batch in float64, so 50,000 images never sit in memory), it
takes any nn.Module as the feature extractor (the same code path serves the tests' stand-in
and the digits classifier), and its default Inception is torch-fidelity's port of the
TensorFlow FID Inception (pt_inception-2015-12-05), the network behind the paper's FID 3.17
and TTUR's reference code, so the numbers are comparable with published ones.

The Inception weights are downloaded once into torch's hub cache; without a network the
download fails within seconds with a message that names the file and where it goes.
"""

import os
import socket
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_FILE = os.path.basename(INCEPTION_URL)


def _need_torchmetrics():
    try:
        import torchmetrics  # noqa: F401
    except ImportError as e:  # pragma: no cover - in the fid and dev extras
        raise ImportError('FID needs torchmetrics and torch-fidelity: pip install "ddpm-fast[fid]"') from e


def inception_weights(path: str | None = None, timeout: float = 15.0) -> str:
    """The path of the FID Inception weights: `path` if given (it must exist), else torch's hub
    cache, downloading them there the first time (failing within `timeout` seconds without a
    network, with a ConnectionError that says where to put the file)."""
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--inception-weights {path!r}: no such file")
        return _checked_weights(path, "--inception-weights")
    target = os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE)
    if os.path.isfile(target):
        return _checked_weights(target, "the cached Inception weights")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    old = socket.getdefaulttimeout()
    try:
        socket.setdefaulttimeout(timeout)
        torch.hub.download_url_to_file(INCEPTION_URL, target, progress=False)
    except Exception as e:  # URLError, timeouts, HTTP errors
        raise ConnectionError(
            f"the FID Inception weights could not be downloaded ({type(e).__name__}: {e}). On a machine with "
            f"internet access download {INCEPTION_URL} and put it at {target} (or pass its path with "
            "--inception-weights)"
        ) from None
    finally:
        socket.setdefaulttimeout(old)
    return target


def _checked_weights(path: str, what: str) -> str:
    """`path` if it holds a state_dict (tensors by name), else a ValueError naming `what`: a wrong
    file failed later, deep inside torchmetrics."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, truncated, foreign objects
        raise ValueError(f"{what} {path!r} is not a weights file ({type(e).__name__}: {str(e)[:200]}); expected "
                         f"{INCEPTION_FILE} from {INCEPTION_URL}") from None  # fmt: skip
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{what} {path!r} holds no state_dict of tensors; expected {INCEPTION_FILE} from "
                         f"{INCEPTION_URL}")  # fmt: skip
    return path


def frechet_metric(feature: nn.Module | None = None, weights: str | None = None, device="cpu"):
    """A torchmetrics FrechetInceptionDistance on `device`: with `feature` (any module mapping
    uint8 NCHW images to (N, D) features) or Inception's 2048-d pool features. Real features are
    kept across `reset()` so a trainer computes them once."""
    _need_torchmetrics()
    from torchmetrics.image.fid import FrechetInceptionDistance

    if feature is None:
        metric = FrechetInceptionDistance(2048, reset_real_features=False,
                                          feature_extractor_weights_path=inception_weights(weights))  # fmt: skip
    else:
        metric = FrechetInceptionDistance(feature, reset_real_features=False)
    return metric.to(device)


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (the model's range) as uint8, same shape: 256 levels, clamped."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] as uint8 NCHW, 3 channels (grey ones repeated): what FID's Inception takes."""
    return _uint8_rgb(quantize(images))


def _uint8_rgb(x: torch.Tensor) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def dataset_batches(data, batch_size: int = 256, limit: int | None = None) -> Iterator[torch.Tensor]:
    """uint8 NCHW batches (3 channels) of the first `limit` images of a data set of
    (image in [-1, 1], label) pairs, in order."""
    n = len(data) if limit is None else min(limit, len(data))
    for start in range(0, n, batch_size):
        yield to_uint8(torch.stack([data[i][0] for i in range(start, min(n, start + batch_size))]))


def image_batches(source: str, batch_size: int = 256, class_name=None, data_root: str | None = None,
                  limit: int | None = None) -> Iterator[torch.Tensor]:  # fmt: skip
    """uint8 NCHW batches (3 channels) from an .npz (arr_0, or `samples` as ddpm-fast wrote it
    before 0.2: NHWC uint8), a folder of images, or a data set name: `cifar10` (the training
    split, `class_name` to keep one class, under `data_root`) or `digits`."""
    from ddpm_fast.data import ImageFolderDataset, cifar10_dataset, digits_dataset

    if source.endswith(".npz"):
        with np.load(source) as f:
            key = "arr_0" if "arr_0" in f else "samples" if "samples" in f else None
            if key is None:
                raise ValueError(f"{source!r} holds no arr_0 (nor samples) array of images")
            array = f[key]
        if array.ndim != 4 or array.dtype != np.uint8:
            raise ValueError(f"{source!r}: expected uint8 images (N, H, W, C), got {array.dtype} {array.shape}")
        array = array[:limit]
        for start in range(0, len(array), batch_size):
            yield _uint8_rgb(torch.from_numpy(array[start : start + batch_size]).permute(0, 3, 1, 2))
        return
    if source == "cifar10":
        data = cifar10_dataset(data_root or "data", class_name, flip=False)
    elif source == "digits":
        data = digits_dataset(8)
    elif os.path.isdir(source):
        from PIL import Image

        probe = ImageFolderDataset(source, 8, flip=False, verify=False)
        with Image.open(probe.files[0]) as im:  # the folder's own size (its first image's)
            size = min(im.size)
        data = ImageFolderDataset(source, size, flip=False)
    else:
        raise ValueError(f"{source!r} is not an .npz file, an image folder, cifar10 or digits")
    yield from dataset_batches(data, batch_size, limit)


def fid(real: str, fake: str, feature: nn.Module | None = None, weights: str | None = None, batch_size: int = 256,
        device="cpu", limit: int | None = None, **source_kwargs) -> float:  # fmt: skip
    """The Frechet distance between two image sources (see image_batches) in Inception's
    feature space (or `feature`'s). Under torch.distributed (torchrun) each rank takes every
    world-th batch (rank, rank + world, ...), and torchmetrics sums the statistics (float64) over
    the ranks in compute(), which every rank calls: each gets the value one process would."""
    import torch.distributed as dist

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    metric = frechet_metric(feature, weights, device)
    with torch.no_grad():
        for name, is_real in ((real, True), (fake, False)):
            for k, x in enumerate(image_batches(name, batch_size, limit=limit, **source_kwargs)):
                if k % world == rank:
                    metric.update(x.to(device), real=is_real)
    return float(metric.compute())


def inception_score(source: str, weights: str | None = None, batch_size: int = 256, device="cpu",
                    limit: int | None = None, **source_kwargs) -> tuple[float, float]:  # fmt: skip
    """Inception Score (mean, std over 10 splits) of an image source, through torchmetrics."""
    _need_torchmetrics()
    from torchmetrics.image.inception import InceptionScore

    metric = InceptionScore(feature_extractor_weights_path=inception_weights(weights)).to(device)
    with torch.no_grad():
        for x in image_batches(source, batch_size, limit=limit, **source_kwargs):
            metric.update(x.to(device))
    mean, std = metric.compute()
    return float(mean), float(std)


# -- the demo's quality figure: a Frechet distance in a digits classifier's feature space ---------


class DigitsFeatures(nn.Module):
    """A small CNN trained to classify the 8x8 digits; its 32-d penultimate layer is the feature
    space of the demo's Frechet distance. Takes uint8 NCHW images (3 equal channels or 1)."""

    num_features = 32

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(),
            nn.Flatten(), nn.Linear(32 * 16, self.num_features), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(self.num_features, 10)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :1].float() / 127.5 - 1 if x.dtype == torch.uint8 else x[:, :1].float()
        return F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False) if x.shape[-1] != 8 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self._prepare(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward(x))


def train_digits_features(
    images: torch.Tensor, labels: torch.Tensor, epochs: int = 30, seed: int = 0
) -> DigitsFeatures:
    """Train DigitsFeatures on digits in [-1, 1] (N, 1, 8, 8): a couple of seconds on a CPU,
    about 91% accuracy on the 360 held-out digits (written by other people)."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = DigitsFeatures()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=g)
        for start in range(0, len(images), 64):
            idx = order[start : start + 64]
            loss = F.cross_entropy(net.logits(images[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval().requires_grad_(False)


def frechet_distance(feature: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> float:
    """The Frechet distance between two sets of images in [-1, 1] in `feature`'s space, through
    the same torchmetrics code path as FID."""
    metric = frechet_metric(feature, device=real.device)
    with torch.no_grad():
        metric.update(to_uint8(real), real=True)
        metric.update(to_uint8(fake), real=False)
    return float(metric.compute())
