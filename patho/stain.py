"""Stain normalisation and augmentation for H&E tiles, on torchstain and scikit-image.

* `StainNormalizer("macenko" | "reinhard")`: fit on a target tile, then map other tiles' stain appearance onto it.
  Wraps torchstain's numpy backend (Macenko et al. 2009; Reinhard et al. 2001).
* `hed_jitter`: Tellez et al. 2018 HED colour augmentation: per-channel `alpha * x + beta` in skimage's HED space.
* `estimate_stain_matrix`: the Macenko H/E optical-density vectors of a tile, to measure what normalisation did.

All functions take and return RGB `uint8` arrays of shape (H, W, 3); PIL images are accepted and returned as PIL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image
from skimage.color import hed2rgb, rgb2hed
from torchstain.base.normalizers import MacenkoNormalizer, ReinhardNormalizer


def _as_array(img) -> tuple[np.ndarray, bool]:
    if isinstance(img, Image.Image):
        return np.asarray(img.convert("RGB")), True
    arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 array of shape (H, W, 3), got {arr.dtype} {arr.shape}")
    return arr, False


def _restore(arr: np.ndarray, was_pil: bool):
    return Image.fromarray(arr) if was_pil else arr


class StainNormalizer:
    """Map tiles onto the stain appearance of a target tile."""

    def __init__(self, method: Literal["macenko", "reinhard"] = "macenko"):
        if method == "macenko":
            self._impl = MacenkoNormalizer(backend="numpy")
        elif method == "reinhard":
            self._impl = ReinhardNormalizer(backend="numpy")
        else:
            raise ValueError(f"unknown stain normalisation method {method!r}; use 'macenko' or 'reinhard'")
        self.method = method
        self.fitted = False

    def fit(self, target) -> StainNormalizer:
        arr, _ = _as_array(target)
        self._impl.fit(arr)
        self.fitted = True
        return self

    def __call__(self, img):
        if not self.fitted:
            raise RuntimeError("StainNormalizer.fit(target) must be called before normalising")
        arr, was_pil = _as_array(img)
        if self.method == "macenko":
            out, _, _ = self._impl.normalize(I=arr, stains=False)
        else:
            out = self._impl.normalize(I=arr)
        return _restore(np.clip(out, 0, 255).astype(np.uint8).reshape(arr.shape), was_pil)


def estimate_stain_matrix(img) -> np.ndarray:
    """The (3, 2) Macenko stain matrix (columns: H and E optical-density unit vectors) of a tile."""
    arr, _ = _as_array(img)
    normalizer = MacenkoNormalizer(backend="numpy")
    normalizer.fit(arr)
    he = np.asarray(normalizer.HERef, dtype=np.float64)
    return he / np.linalg.norm(he, axis=0, keepdims=True)


def stain_angle(a: np.ndarray, b: np.ndarray) -> float:
    """Mean angle in radians between corresponding stain vectors of two stain matrices."""
    cos = np.clip(np.sum(a * b, axis=0) / (np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0)), -1.0, 1.0)
    return float(np.mean(np.arccos(cos)))


@dataclass(frozen=True)
class HEDJitter:
    """Tellez et al. 2018: scale each HED channel by U(1-sigma, 1+sigma) and shift it by U(-bias, bias)."""

    sigma: float = 0.05
    bias: float = 0.05

    def __call__(self, img, rng: np.random.Generator | None = None):
        return hed_jitter(img, sigma=self.sigma, bias=self.bias, rng=rng)


def hed_jitter(img, sigma: float = 0.05, bias: float = 0.05, rng: np.random.Generator | None = None):
    arr, was_pil = _as_array(img)
    rng = rng or np.random.default_rng()
    hed = rgb2hed(arr)
    alpha = rng.uniform(1 - sigma, 1 + sigma, size=3)
    beta = rng.uniform(-bias, bias, size=3)
    # skimage's HED values are small optical densities; scale the shift by each channel's range so `bias` is relative.
    span = np.maximum(hed.reshape(-1, 3).max(0) - hed.reshape(-1, 3).min(0), 1e-6)
    hed = hed * alpha + beta * span
    rgb = hed2rgb(hed)
    out = np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return _restore(out, was_pil)
