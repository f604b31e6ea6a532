"""Data sets. The built-in one, scikit-learn's 8x8 handwritten digits, needs no download."""

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset


def digits_dataset(image_size: int = 16) -> TensorDataset:
    """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels), resized bilinearly to
    image_size x image_size and scaled to [-1, 1]: a TensorDataset of (image, label)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is in the dev extra
        raise ImportError("the digits data set needs scikit-learn: pip install scikit-learn") from e
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    digits = load_digits()
    x = torch.from_numpy(digits.images).float().div(16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return TensorDataset(x.clamp(0, 1) * 2 - 1, torch.from_numpy(digits.target).long())
