"""Data sets: the built-in digits, CIFAR-10 from files in its own format, image folders."""

import os
import pickle

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from ddpm_fast.data import CIFAR10_CLASSES, ImageFolderDataset, cifar10_dataset, digits_dataset, make_dataset


def test_digits_in_model_range():
    data = digits_dataset(16)
    x, y = data[0]
    assert len(data) == 1797 and x.shape == (1, 16, 16) and 0 <= int(y) <= 9
    assert -1 <= data.tensors[0].min() and data.tensors[0].max() <= 1 and data.tensors[0].min() < -0.9


def write_cifar10(root, per_batch=12):
    """CIFAR-10's python format: pickled dicts of uint8 rows (3072 = 3 x 32 x 32, CHW) and labels."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [int(i % 10) for i in range(per_batch)]
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        data[:, :1024] = np.array(labels, dtype=np.uint8)[:, None] * 20  # red channel encodes the label
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"data": data, "labels": labels, "batch_label": name}, f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": list(CIFAR10_CLASSES)}, f)


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    write_cifar10(str(tmp_path))
    # torchvision checks the files' md5 sums against the real archive's: ours are small fakes.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    return str(tmp_path)


def test_cifar10_class_filter_by_name_and_index(cifar_root):
    planes = cifar10_dataset(cifar_root, "airplane", flip=False)
    ships = cifar10_dataset(cifar_root, 8, flip=False)
    assert len(planes) == 5 * 2 and len(ships) == 5 * 1  # 12 per batch: labels 0-9, 0, 1
    for i in range(len(planes)):
        x, y = planes[i]
        assert y == 0 and x.shape == (3, 32, 32)
        torch.testing.assert_close(x[0], torch.full((32, 32), -1.0))  # red = 0 for class 0, scaled to -1
    x, y = ships[0]
    assert y == 8 and abs(x[0, 0, 0].item() - (160 / 255 * 2 - 1)) < 1e-6
    assert len(cifar10_dataset(cifar_root)) == 60


def test_unknown_class_lists_the_valid_ones(cifar_root):
    with pytest.raises(ValueError, match="unknown CIFAR-10 class 'plane'; choose one of airplane, automobile"):
        cifar10_dataset(cifar_root, "plane")


def test_missing_cifar10_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="CIFAR-10 is not under .*--download"):
        cifar10_dataset(str(tmp_path), "airplane")


def test_image_folder(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "a" / "red.png")
    Image.new("RGB", (20, 20), (0, 0, 255)).save(tmp_path / "a" / "b" / "blue.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    data = ImageFolderDataset(str(tmp_path), 16, flip=False)
    assert len(data) == 2
    x, _ = data[0]
    assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1
    grey = make_dataset("folder", 8, root=str(tmp_path), channels=1)
    assert grey[1][0].shape == (1, 8, 8)


def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(str(tmp_path), 16)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(str(tmp_path / "nope"), 16)
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        make_dataset("mnist", 32)


def test_download_without_a_network_says_so(tmp_path, monkeypatch):
    import urllib.error

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", no_network)
    with pytest.raises(ConnectionError, match="downloading CIFAR-10 failed .* no internet access"):
        cifar10_dataset(str(tmp_path), "airplane", download=True)
