"""The embedded default: scikit-learn's 8x8 handwritten digits (shipped with it, no download) as codes.

The patch path (``codegpt demo --autoencoder patches``): the "autoencoder" is the identity on pixel
patches (`codegpt.autoencoders.PatchAutoencoder(8, 1, 2, scale=16)`): each image (values 0-16) is cut
into 2x2 patches, a k-means codebook over the 4-d patch vectors codes every patch, and each image
becomes a 4x4 code grid with its digit as the class::

    fitted = digits_code_dataset("digits", seed=0)          # digits/codebook, digits/data
    train, val = fitted.train, fitted.val                    # the codebook saw train only
    images = codes_to_images(fitted.codebook, codes, patch=2)   # codes (N, 4, 4) -> (N, 8, 8)
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from ._util import check_int
from .autoencoders import PatchAutoencoder
from .codebook import Codebook
from .data import FittedCodes, fit_code_dataset

__all__ = [
    "DIGITS_CLASS_NAMES", "codes_to_images", "digits_code_dataset", "load_digits_images", "patch_decoder",
    "patchify", "unpatchify",
]

DIGITS_CLASS_NAMES = [str(digit) for digit in range(10)]
DIGITS_MAX_VALUE = 16  # pixel intensities run from 0 to 16


def load_digits_images() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 digits as float32 images (1797, 8, 8) in [0, 16] and int64 labels (1797,)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError("the digits dataset needs scikit-learn: pip install 'codegpt[demo]'") from err
    digits = load_digits()
    return torch.from_numpy(digits.images.astype(np.float32)), torch.from_numpy(digits.target.astype(np.int64))


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """Cut images (N, H, W) into non-overlapping patches: (N, H/p, W/p, p*p), row-major.

    The layout is `PatchAutoencoder`'s (one home); this keeps the values as given (the digits' 0-16,
    any dtype) where the autoencoder's interface wants floats in [0, 1].
    """
    images = torch.as_tensor(images)  # a tensor or any array, its dtype kept
    if images.ndim != 3:
        raise ValueError(f"images must have shape (N, H, W), got {tuple(images.shape)}")
    # PatchAutoencoder checks the patch size (an int that divides the image's).
    patches = PatchAutoencoder(tuple(images.shape[1:]), 1, patch)._encode_batch(images[:, None])
    return patches.to(images.dtype)  # scale 1: exact for any dtype


def unpatchify(vectors: torch.Tensor, patch: int) -> torch.Tensor:
    """Inverse of `patchify`: (N, h, w, p*p) -> images (N, h*p, w*p)."""
    vectors = torch.as_tensor(vectors)
    check_int("patch", patch, low=1)
    if vectors.ndim != 4 or vectors.shape[-1] != patch * patch:
        raise ValueError(f"vectors must have shape (N, h, w, {patch * patch}) for patch={patch}, "
                         f"got {tuple(vectors.shape)}")
    size = (vectors.shape[1] * patch, vectors.shape[2] * patch)
    return PatchAutoencoder(size, 1, patch)._decode_batch(vectors)[:, 0].to(vectors.dtype)


def codes_to_images(codebook: Codebook, codes: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """Decode code grids (N, h, w) into images (N, h*p, w*p) through a patch codebook."""
    return unpatchify(codebook.decode(codes), patch)


def digits_code_dataset(out_dir: str | os.PathLike[str], num_codes: int = 128, patch: int = 2, seed: int = 0,
                        val_fraction: float = 0.2, progress: bool = False,
                        kmeans: Mapping[str, Any] | None = None) -> FittedCodes:
    """Fit a patch codebook on the digits' training split and write all 1797 images as codes.

    Writes ``out_dir/codebook`` and ``out_dir/data`` through ``codegpt.data.fit_code_dataset``: each image
    becomes an (8/p, 8/p) code grid; the validation images (``val_fraction`` split by ``seed``, the split
    ``CodeDataset.split`` gives; 0 for none) stay unseen by the fit. Metrics are on the 0-16 pixel scale.
    ``kmeans``: more keyword arguments of ``Codebook.fit`` (``batch_size``, ``max_epochs``, ``tol``).
    """
    images, labels = load_digits_images()
    patches = patchify(images, patch)  # checks patch
    side = 8 // patch
    return fit_code_dataset(
        out_dir, patches, labels, num_codes=num_codes, val_fraction=val_fraction, seed=seed,
        num_classes=10, class_names=DIGITS_CLASS_NAMES, progress=progress, kmeans=kmeans,
        codebook_description=f"{patch}x{patch} pixel patches of scikit-learn's 8x8 digits, values 0-16, "
                             "flattened row-major",
        description=f"scikit-learn digits: {side}x{side} codes of {patch}x{patch} pixel "
                    f"patches, k-means codebook of {num_codes} codes (seed {seed})",
    )


def patch_decoder(codebook: Codebook, patch: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """codes (B, H, W) -> images (B, H*p, W*p) in [0, 1] through a patch codebook: the one renderer of
    codes as pixels (training's sample grids, ``codegpt sample``, the demo).

    Pixels are scaled by the range of the centroids, so any patch codebook renders without knowing
    its pixel scale. ``patch`` defaults to the square root of the codebook's dim.
    """
    if patch is None and math.isqrt(codebook.dim) ** 2 != codebook.dim:
        raise ValueError(f"codebook vectors have dim {codebook.dim}, not a square patch; pass patch (--patch), or "
                         "draw each code as a coloured cell (no codebook)")
    patch = math.isqrt(codebook.dim) if patch is None else check_int("patch", patch, low=1)
    if patch * patch != codebook.dim:
        raise ValueError(f"patch {patch} needs codebook vectors of dim {patch * patch}, got {codebook.dim}")
    low, high = float(codebook.centroids.min()), float(codebook.centroids.max())

    def decode(codes: torch.Tensor) -> torch.Tensor:
        images = codes_to_images(codebook, codes.cpu(), patch)
        return ((images - low) / max(high - low, 1e-12)).clamp(0, 1)

    return decode

