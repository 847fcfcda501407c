"""The embedded default: scikit-learn's 8x8 handwritten digits as a code dataset.

The "autoencoder" is the identity on small pixel patches: each 8x8 image (values 0-16) is cut into
2x2 patches, a k-means codebook over the 4-dimensional patch vectors turns every patch into a code,
and each image becomes a 4x4 grid of codes with its digit (0-9) as the class. The data ships inside
scikit-learn (no download); fitting takes well under a second on a laptop CPU.

Example::

    codebook, path, metrics = digits_code_dataset("digits-codes", seed=0)
    dataset = CodeDataset(path)
    images = codes_to_images(codebook, codes, patch=2)   # codes (N, 4, 4) -> (N, 8, 8)
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .codebook import Codebook
from .data import write_code_dataset

__all__ = [
    "DIGITS_CLASS_NAMES",
    "codes_to_images",
    "digits_code_dataset",
    "load_digits_images",
    "patchify",
    "unpatchify",
]

DIGITS_CLASS_NAMES = [str(digit) for digit in range(10)]
DIGITS_MAX_VALUE = 16  # pixel intensities run from 0 to 16


def load_digits_images() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 digits as float32 images (1797, 8, 8) in [0, 16] and int64 labels (1797,)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError(
            "the digits dataset needs scikit-learn: pip install 'codegpt[demo]'"
        ) from err
    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32))
    labels = torch.from_numpy(digits.target.astype(np.int64))
    return images, labels


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """Cut images (N, H, W) into non-overlapping patches: (N, H/p, W/p, p*p), row-major."""
    images = _check_images(images)
    _check_patch(patch)
    n, height, width = images.shape
    if height % patch or width % patch:
        raise ValueError(f"image size {(height, width)} must be divisible by patch={patch}")
    grid_h, grid_w = height // patch, width // patch
    patches = images.reshape(n, grid_h, patch, grid_w, patch).permute(0, 1, 3, 2, 4)
    return patches.reshape(n, grid_h, grid_w, patch * patch)


def unpatchify(vectors: torch.Tensor, patch: int) -> torch.Tensor:
    """Inverse of `patchify`: (N, h, w, p*p) -> images (N, h*p, w*p)."""
    if not isinstance(vectors, torch.Tensor):
        raise TypeError(f"vectors must be a torch.Tensor, got {type(vectors).__name__}")
    _check_patch(patch)
    if vectors.ndim != 4 or vectors.shape[-1] != patch * patch:
        raise ValueError(f"vectors must have shape (N, h, w, {patch * patch}) for patch={patch}, "
                         f"got {tuple(vectors.shape)}")
    n, grid_h, grid_w, _ = vectors.shape
    images = vectors.reshape(n, grid_h, grid_w, patch, patch).permute(0, 1, 3, 2, 4)
    return images.reshape(n, grid_h * patch, grid_w * patch)


def codes_to_images(codebook: Codebook, codes: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """Decode code grids (N, h, w) into images (N, h*p, w*p) through a patch codebook."""
    return unpatchify(codebook.decode(codes), patch)


def digits_code_dataset(
    out_dir: str | os.PathLike[str],
    num_codes: int = 128,
    patch: int = 2,
    seed: int = 0,
    *,
    fit_on: torch.Tensor | np.ndarray | list[int] | None = None,
    overwrite: bool = True,
    progress: bool = False,
) -> tuple[Codebook, Path, dict[str, Any]]:
    """Fit a patch codebook on the digits and write all 1797 images as a code dataset.

    Args:
        out_dir: the dataset folder to write (see `codegpt.data`).
        num_codes: codebook size K (the prior's vocabulary is K + 1).
        patch: patch side p; 8 must be divisible by it. Each image becomes (8/p, 8/p) codes.
        seed: seeds the k-means fit; the same seed gives the same codebook and dataset.
        fit_on: indices of the images whose patches the codebook is fitted on (e.g. a training
            split, so the validation images stay unseen); default all 1797.
        overwrite: replace a dataset already in `out_dir`.
        progress: show the k-means progress bar.

    Returns:
        (codebook, dataset path, metrics). The codebook is not saved; call
        `codebook.save_pretrained(...)` to keep it. Metrics: `mse` (per pixel, on the 0-16 scale,
        over all images), `mse_fit` and `mse_held_out` when `fit_on` is given, `fit_seconds`,
        `perplexity` and `dead_codes` (code usage over all images), `num_images`, `grid`.
    """
    images, labels = load_digits_images()
    _check_patch(patch)
    if 8 % patch:
        raise ValueError(f"patch must divide the digits' size 8, got {patch}")
    vectors = patchify(images, patch)  # (N, h, w, p*p)
    fit_mask = torch.ones(len(images), dtype=torch.bool)
    if fit_on is not None:
        index = torch.as_tensor(np.asarray(fit_on))
        if index.dtype == torch.bool or index.is_floating_point() or index.ndim != 1:
            raise TypeError(f"fit_on must be a 1-D sequence of image indices, got {index.dtype} "
                            f"of shape {tuple(index.shape)}")
        if index.numel() == 0 or int(index.min()) < 0 or int(index.max()) >= len(images):
            raise ValueError(f"fit_on must be non-empty indices in [0, {len(images)})")
        fit_mask = torch.zeros(len(images), dtype=torch.bool)
        fit_mask[index] = True

    start = time.perf_counter()
    codebook = Codebook.fit(
        vectors[fit_mask], num_codes, seed=seed, progress=progress,
        description=f"{patch}x{patch} pixel patches of scikit-learn's 8x8 digits, values 0-16, "
                    "flattened row-major",
    )
    fit_seconds = time.perf_counter() - start

    codes = codebook.encode(vectors)  # (N, h, w)
    grid = tuple(codes.shape[1:])
    path = write_code_dataset(
        out_dir, codes, labels, codebook_size=num_codes, num_classes=10,
        class_names=DIGITS_CLASS_NAMES, overwrite=overwrite,
        description=f"scikit-learn digits: {grid[0]}x{grid[1]} codes of {patch}x{patch} pixel "
                    f"patches, k-means codebook of {num_codes} codes (seed {seed})",
    )
    stats = codebook.stats(vectors)
    metrics: dict[str, Any] = {
        "mse": stats.mse,
        "fit_seconds": fit_seconds,
        "perplexity": stats.perplexity,
        "dead_codes": stats.dead_codes,
        "num_images": len(images),
        "grid": grid,
    }
    if fit_on is not None:
        metrics["mse_fit"] = codebook.stats(vectors[fit_mask]).mse
        if not bool(fit_mask.all()):
            metrics["mse_held_out"] = codebook.stats(vectors[~fit_mask]).mse
    return codebook, path, metrics


def _check_images(images: Any) -> torch.Tensor:
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise TypeError(
            f"images must be a torch.Tensor or numpy array, got {type(images).__name__}"
        )
    if images.ndim != 3:
        raise ValueError(f"images must have shape (N, H, W), got {tuple(images.shape)}")
    return images


def _check_patch(patch: Any) -> None:
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
        raise ValueError(f"patch must be an int >= 1, got {patch!r}")
