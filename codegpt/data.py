"""Code datasets on disk: the format, a writer, and a validating, lazily read torch Dataset.

A code dataset is a folder::

    dataset.json                  metadata, written last: a folder without it is incomplete
    codes-00000.safetensors       tensors "codes" (n, H, W) and, if num_classes > 0, "labels" (n,)
    codes-00001.safetensors       ...

`dataset.json` holds the format and version, `codebook_size`, `grid` [H, W], `num_classes`, `class_names`
(or null), `num_items`, `description` and the shards with their item counts, sizes and SHA-256 digests
(`_util.file_record`; datasets written before codegpt recorded them have counts only), and what made the codes
when the writer was told (`metadata`): `autoencoder` (its spec, see `codegpt.autoencoders`), `codebook`
(the codebook's folder, relative to the dataset's), `split` (how this set relates to its held-out part),
`source` (the images). Codes and labels are stored in
the smallest integer type that holds their range (uint8, int16, then int32: 16x16 codes of a 1024-code
codebook take 512 bytes per image); readers accept any 8-64-bit integer type, so other tools' shards load.

Opening a dataset validates it (`CodeDataset`) in one streaming pass, chunk by chunk, so memory stays bounded
however large the set; `verify=True` (and `codegpt verify DIR`) also checks the SHA-256 digests, which catches a
flipped bit that leaves every value in range. Items are then read lazily through memory maps opened on first use
in each process (DataLoader workers map their own). `CodeDatasetWriter` swaps a dataset in only when complete.

Items follow the model's token convention: for a codebook of size K, `input_ids` = [K, c_1, ..., c_N]
(K is the start token, codes row-major, N = H*W), `labels` = `input_ids` with `labels[0] = -100` (the model
shifts internally), and `classes` = the class id (absent when the dataset is unconditional).
"""

from __future__ import annotations

import json
import operator
import os
import re
import secrets
import shutil
import struct
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch.utils.data import Dataset, Subset

from ._util import (
    as_tensor,
    check_file_records,
    check_format,
    check_int,
    file_record,
    jsonable,
    replace_dir,
    save_safetensors,
    write_json,
)
from .codebook import Codebook

__all__ = [
    "CodeDataset", "CodeDatasetWriter", "FittedCodes", "fit_code_dataset", "load_code_dataset",
    "split_indices", "storage_dtype", "write_code_dataset",
]

FORMAT = "codegpt.code_dataset"
FORMAT_VERSION = 1
METADATA_NAME = "dataset.json"
SHARD_NAME = "codes-{:05d}.safetensors"
DEFAULT_SHARD_SIZE = 65_536
IGNORE_INDEX = -100  # transformers' "no loss here" label
# A dataset.json declaring more codes or classes than this is damaged, not large: a prior's embedding of
# 2**24 rows already holds billions of weights (the largest published codebooks have 2**18 codes).
MAX_VOCABULARY = 1 << 24

# The keys dataset.json holds for the format itself; anything else is the writer's `metadata`.
_FORMAT_KEYS = frozenset({"format", "format_version", "codebook_size", "grid", "num_classes", "class_names",
                          "num_items", "description", "codes_dtype", "labels_dtype", "shards"})
_SHARD_RE = re.compile(r"codes-\d{5,}\.safetensors")
# What a write killed midway leaves in a dataset folder (``_util.atomic_write``'s temporary files).
_WRITE_LEFTOVER_RE = re.compile(r"\..+\.tmp")
# safetensors dtype names -> little-endian numpy dtypes; codes and labels are integers only.
_INT_DTYPES = {"U8": "u1", "I8": "i1", "U16": "<u2", "I16": "<i2", "U32": "<u4", "I32": "<i4",
               "I64": "<i8"}
# Streaming validation reads at most this many elements of a shard at once.
_SCAN_ELEMENTS = 1 << 22


def storage_dtype(num_values: int) -> torch.dtype:
    """Smallest integer dtype that stores every value in [0, num_values)."""
    for bits, dtype in ((8, torch.uint8), (15, torch.int16), (31, torch.int32)):
        if num_values <= 1 << bits:
            return dtype
    return torch.int64


class CodeDatasetWriter:
    """Writes a code dataset shard by shard, for sets that do not fit in memory.

    Use as a context manager; `add` as many batches as needed::

        with CodeDatasetWriter("codes/", codebook_size=1024, num_classes=1000) as writer:
            for codes, labels in batches:          # codes (n, H, W), labels (n,)
                writer.add(codes, labels)

    Everything is written into a hidden folder beside `path` (`.NAME.tmp-*`), `dataset.json` last with
    each shard's size and SHA-256, and the finished folder replaces `path` in one swap at `close`: a
    crash or an error partway leaves `path` as it was (an old dataset intact). If the block raises,
    the shards written so far are removed.

    Args:
        path: the dataset folder (created if needed).
        codebook_size: K; codes must lie in [0, K).
        num_classes: number of classes C (labels in [0, C)); 0 for an unconditional dataset,
            which then takes no labels.
        class_names: optional names, one per class.
        grid: (H, W) of each item's codes; default: taken from the first `add`.
        shard_size: items per shard file.
        description: free text stored in the metadata (which codebook made the codes, ...).
        metadata: JSON-able records stored beside the format's own keys in `dataset.json` (e.g.
            `autoencoder`, `codebook`, `split`, `source`); exposed as `CodeDataset.metadata`.
        overwrite: replace an existing dataset in `path` (at `close`, by the swap; until then it is
            untouched). A folder holding anything but a code dataset's files is never replaced.
    """

    def __init__(self, path: str | os.PathLike[str], *, codebook_size: int, num_classes: int = 0,
                 class_names: list[str] | tuple[str, ...] | None = None, grid: tuple[int, int] | None = None,
                 shard_size: int = DEFAULT_SHARD_SIZE, description: str = "", overwrite: bool = False,
                 metadata: dict[str, Any] | None = None) -> None:
        _check_vocabulary("codebook_size", codebook_size, low=1)
        extra = dict(metadata or {})
        clash = sorted(set(extra) & _FORMAT_KEYS)
        if clash:
            raise ValueError(f"metadata must not set the format's own keys {clash}")
        try:
            json.dumps(extra)
        except (TypeError, ValueError) as err:
            raise TypeError(f"metadata must be JSON-able: {err}") from None
        _check_vocabulary("num_classes", num_classes, low=0)
        check_int("shard_size", shard_size, low=1)
        self.class_names = _check_class_names(class_names, num_classes)
        if grid is not None:
            grid = _check_grid(grid)
        if not isinstance(description, str):
            raise TypeError(f"description must be a str, got {type(description).__name__}")
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise NotADirectoryError(f"{self.path} exists and is not a folder")
        if (self.path / METADATA_NAME).exists() and not overwrite:
            raise FileExistsError(f"{self.path} already holds a code dataset; pass overwrite=True to replace it")
        # The swap at close replaces the whole folder: never one that holds anything else.
        foreign = sorted(p.name for p in self.path.iterdir() if p.name != METADATA_NAME
                         and not _SHARD_RE.fullmatch(p.name) and not _WRITE_LEFTOVER_RE.fullmatch(p.name)
                         ) if self.path.is_dir() else []
        if foreign:
            raise FileExistsError(f"{self.path} holds files that are not a code dataset's ({', '.join(foreign[:3])}"
                                  f"{', ...' if len(foreign) > 3 else ''}); write the dataset to a new or empty folder")
        self.path.mkdir(parents=True, exist_ok=True)
        _remove_dead_work(self.path)
        self._work = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        self._work.mkdir()
        self.codebook_size, self.num_classes, self.grid, self.shard_size = codebook_size, num_classes, grid, shard_size
        self.description, self.metadata = description, extra
        self.codes_dtype = storage_dtype(codebook_size)
        self.labels_dtype = storage_dtype(num_classes) if num_classes > 0 else None
        self.shards: list[dict[str, Any]] = []
        self.num_items = 0  # added so far, written or buffered
        self._buffer: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self._buffered = 0
        self._closed = False
        self._aborted = False

    def __enter__(self) -> CodeDatasetWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def add(self, codes: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray | None = None) -> None:
        """Append items: codes (n, H, W) in [0, codebook_size), labels (n,) in [0, num_classes)."""
        if self._closed:
            raise RuntimeError("this CodeDatasetWriter is closed")
        codes = as_tensor("codes", codes, integer=True).cpu()
        if codes.ndim != 3:
            raise ValueError(f"codes must have shape (n, H, W), got {tuple(codes.shape)}")
        if self.grid is None:
            self.grid = _check_grid(tuple(codes.shape[1:]))
        if tuple(codes.shape[1:]) != self.grid:
            raise ValueError(f"codes have grid {tuple(codes.shape[1:])}, the dataset's grid is {self.grid}")
        n = codes.shape[0]
        _check_range(codes.reshape(n, -1), self.codebook_size, "code",
                     "codes row {row} (item {item})", self.num_items, grid=self.grid)
        if (labels is None) != (self.num_classes == 0):
            raise ValueError(f"labels are required: the dataset has num_classes={self.num_classes}" if labels is None
                             else "labels were given but num_classes=0 (an unconditional dataset); pass num_classes")
        if labels is not None:
            labels = as_tensor("labels", labels, integer=True).cpu()
            if tuple(labels.shape) != (n,):
                raise ValueError(f"labels must have shape ({n},) to match codes, got {tuple(labels.shape)}")
            _check_range(labels.reshape(n, 1), self.num_classes, "label", "labels row {row} (item {item})",
                         self.num_items)
            labels = labels.to(self.labels_dtype, copy=True)
        if n == 0:
            return
        # Copies: the caller may reuse its arrays before the shard is written.
        self._buffer.append((codes.to(self.codes_dtype, copy=True), labels))
        self._buffered += n
        self.num_items += n
        while self._buffered >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, count: int) -> None:
        codes = torch.cat([c for c, _ in self._buffer])
        labels = None if self.num_classes == 0 else torch.cat([lab for _, lab in self._buffer])
        tensors = {"codes": codes[:count].contiguous()}
        if labels is not None:
            tensors["labels"] = labels[:count].contiguous()
        name = SHARD_NAME.format(len(self.shards))
        save_safetensors(self._work / name, tensors, metadata={"format": FORMAT})
        self.shards.append({"file": name, "num_items": count, **file_record(self._work / name)})
        rest = codes[count:], None if labels is None else labels[count:]
        self._buffer = [rest] if rest[0].shape[0] else []
        self._buffered -= count

    def close(self) -> Path:
        """Write the last shard and `dataset.json`, then swap the finished folder into `path`."""
        if self._aborted:
            raise RuntimeError("this CodeDatasetWriter was aborted; nothing was written")
        if self._closed:
            return self.path
        if self.num_items == 0:
            self.abort()
            raise ValueError("no items were added; a code dataset holds at least one item")
        try:
            if self._buffered:
                self._flush(self._buffered)
            self._write_metadata()
            replace_dir(self._work, self.path)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return self.path

    def _write_metadata(self) -> None:
        write_json(self._work / METADATA_NAME, {
            "format": FORMAT, "format_version": FORMAT_VERSION, "codebook_size": self.codebook_size,
            "grid": list(self.grid), "num_classes": self.num_classes, "class_names": self.class_names,  # type: ignore
            "num_items": self.num_items, "description": self.description, "codes_dtype": jsonable(self.codes_dtype),
            "labels_dtype": jsonable(self.labels_dtype), "shards": self.shards, **self.metadata,
        })

    def abort(self) -> None:
        """Stop, remove what was written so far, and leave `path` as it was."""
        shutil.rmtree(self._work, ignore_errors=True)
        self.shards, self._buffer, self._buffered = [], [], 0
        self._closed = self._aborted = True


def _remove_dead_work(path: Path) -> None:
    """Remove the work folders that killed writers left beside ``path`` (``.NAME.tmp-PID-*`` of a process
    that no longer runs); a live writer's stays."""
    for work in path.parent.glob(f".{path.name}.tmp-*"):
        match = re.fullmatch(rf"\.{re.escape(path.name)}\.tmp-(\d+)-[0-9a-f]+", work.name)
        if match is None or int(match.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(match.group(1)), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            shutil.rmtree(work, ignore_errors=True)
        except (OSError, OverflowError, ValueError):
            pass  # alive under another user, or no way to tell here: leave it


def write_code_dataset(path: str | os.PathLike[str], codes: torch.Tensor | np.ndarray,
                       labels: torch.Tensor | np.ndarray | None = None, *, codebook_size: int, num_classes: int = 0,
                       class_names: list[str] | tuple[str, ...] | None = None, shard_size: int = DEFAULT_SHARD_SIZE,
                       description: str = "", overwrite: bool = False, metadata: dict[str, Any] | None = None) -> Path:
    """Write codes (N, H, W) and labels (N,) as a code dataset in `path`; returns `path`.

    See `CodeDatasetWriter` for the arguments and the guarantees.
    """
    codes = as_tensor("codes", codes, integer=True).cpu()
    if codes.ndim != 3:
        raise ValueError(f"codes must have shape (N, H, W), got {tuple(codes.shape)}")
    if labels is not None:
        labels = as_tensor("labels", labels, integer=True).cpu()
        if tuple(labels.shape) != codes.shape[:1]:
            raise ValueError(f"labels must have shape ({codes.shape[0]},) to match codes, got {tuple(labels.shape)}")
    with CodeDatasetWriter(path, codebook_size=codebook_size, num_classes=num_classes, class_names=class_names,
                           grid=tuple(codes.shape[1:]), shard_size=shard_size, description=description,
                           overwrite=overwrite, metadata=metadata) as writer:
        # Slices keep the dtype conversion's temporary copies one shard large.
        for begin in range(0, max(codes.shape[0], 1), shard_size):
            end = begin + shard_size
            writer.add(codes[begin:end], None if labels is None else labels[begin:end])
    return writer.path


class CodeDataset(Dataset):
    """A code dataset folder as a `torch.utils.data.Dataset` (see the module docstring).

    Opening validates everything and raises `FileNotFoundError` (missing folder, metadata or
    shard) or `ValueError` (anything malformed, naming the file, row and value): the metadata, every
    shard's header, shape, dtype and values, and each shard's size against `dataset.json`'s record;
    ``verify=True`` also compares every shard's SHA-256 with its record (reads every byte twice).
    A dataset written before codegpt recorded sizes loads with a warning that it cannot be checked
    (`has_records` is False). Attributes:
    `codebook_size`, `grid`, `seq_len` (H*W), `num_classes`, `class_names`, `start_token_id`
    (= codebook_size), `vocab_size` (= codebook_size + 1), `labels` (all class ids, int64, or
    None), `description`, `metadata` (what the writer recorded beside the format: `autoencoder`,
    `codebook`, `split`, `source`; {} when none) and `autoencoder` (the recorded spec or None).
    """

    def __init__(self, path: str | os.PathLike[str], verify: bool = False) -> None:
        self.path = Path(path)
        meta = _read_metadata(self.path)
        self.codebook_size: int = meta["codebook_size"]
        self.grid: tuple[int, int] = tuple(meta["grid"])  # type: ignore[assignment]
        self.num_classes: int = meta["num_classes"]
        self.class_names: list[str] | None = meta["class_names"]
        self.description: str = meta.get("description", "")
        self.metadata: dict[str, Any] = {k: v for k, v in meta.items() if k not in _FORMAT_KEYS}
        self.seq_len = self.grid[0] * self.grid[1]
        self.start_token_id = self.codebook_size
        self.vocab_size = self.codebook_size + 1

        self._files: list[Path] = []
        self._codes_at: list[tuple[int, np.dtype, int]] = []  # byte offset, dtype and items of "codes"
        self._starts: list[int] = []  # index of each shard's first item
        labels: list[np.ndarray] = []
        self._len = 0
        for shard in meta["shards"]:
            file = self.path / shard["file"]
            offset, dtype, shard_labels = _validate_shard(file, shard["num_items"], self._len, meta)
            self._files.append(file)
            self._codes_at.append((offset, dtype, shard["num_items"]))
            self._starts.append(self._len)
            if shard_labels is not None:
                labels.append(shard_labels)
            self._len += shard["num_items"]
        self.has_records = "bytes" in meta["shards"][0]
        if self.has_records:
            records = {shard["file"]: shard for shard in meta["shards"]}
            check_file_records(self.path, records, str(self.path / METADATA_NAME), hashes=verify)
        else:
            warnings.warn(f"{self.path / METADATA_NAME} records no shard sizes or SHA-256 (written before codegpt "
                          "recorded them): damage that leaves values in range cannot be detected; rewrite the "
                          "dataset to record them", UserWarning, stacklevel=2)
        self.labels: torch.Tensor | None = torch.from_numpy(np.concatenate(labels)) if labels else None
        self._maps: list[np.memmap | None] = [None] * len(self._files)

    def __len__(self) -> int:
        return self._len

    @property
    def autoencoder(self) -> dict[str, Any] | None:
        """The spec of the autoencoder whose latents were quantised into these codes, if recorded."""
        return self.metadata.get("autoencoder")

    def __repr__(self) -> str:
        return (f"CodeDataset({str(self.path)!r}, items={self._len}, grid={self.grid}, "
                f"codebook_size={self.codebook_size}, num_classes={self.num_classes})")

    def _map(self, shard: int) -> np.memmap:
        if self._maps[shard] is None:
            offset, dtype, count = self._codes_at[shard]
            # mode "c" (copy-on-write) gives writable arrays, so torch.from_numpy does not warn;
            # the file itself is never written.
            self._maps[shard] = np.memmap(self._files[shard], dtype=dtype, mode="c", offset=offset,
                                          shape=(count, self.seq_len))
        return self._maps[shard]  # type: ignore[return-value]

    def _index(self, index: Any) -> int:
        i = operator.index(index)
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"index {index} is out of range for a dataset of {self._len} items")
        return i

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        """A batch of items at once (DataLoader uses this): one gather per shard, not per item."""
        idx = np.fromiter((self._index(i) for i in indices), dtype=np.int64, count=len(indices))
        shards = np.searchsorted(self._starts, idx, side="right") - 1
        input_ids = np.empty((len(idx), self.seq_len + 1), dtype=np.int64)
        input_ids[:, 0] = self.start_token_id
        for shard in np.unique(shards):
            rows = shards == shard
            input_ids[rows, 1:] = self._map(int(shard))[idx[rows] - self._starts[shard]]
        labels = input_ids.copy()
        labels[:, 0] = IGNORE_INDEX
        columns = [torch.from_numpy(input_ids), torch.from_numpy(labels)]
        keys = ["input_ids", "labels"]
        if self.labels is not None:
            columns.append(self.labels[torch.from_numpy(idx)])
            keys.append("classes")
        return [dict(zip(keys, row, strict=True)) for row in zip(*columns, strict=True)]

    def split(self, val_fraction: float, seed: int = 0) -> tuple[Subset, Subset]:
        """A reproducible random (train, validation) split: the indices of ``split_indices``."""
        train, val = split_indices(self._len, val_fraction, seed)
        return Subset(self, train), Subset(self, val)

    def __getstate__(self) -> dict[str, Any]:
        # Memory maps stay behind: each process (e.g. a DataLoader worker) maps its own.
        state = self.__dict__.copy()
        state["_maps"] = [None] * len(self._files)
        return state


def split_indices(num_items: int, val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """The (train, validation) indices of a reproducible random split of ``num_items`` items.

    A pure function of (num_items, val_fraction, seed), so it is known before any code exists (e.g.
    to fit a codebook on the training images alone) and equals ``CodeDataset.split``'s. The
    validation part holds round(val_fraction * num_items) items, at least 1, and so does the
    training part. Indices within each part are sorted, which keeps reads local.
    """
    n = num_items
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)):
        raise TypeError(f"val_fraction must be a float, got {type(val_fraction).__name__}")
    num_val = round(val_fraction * n)
    if not 0 < val_fraction < 1 or not 0 < num_val < n:
        raise ValueError(f"val_fraction must leave both parts non-empty: in (0, 1) and between {1 / n:.3g} and "
                         f"{(n - 1) / n:.3g} for {n} items, got {val_fraction}")
    check_int("seed", seed, low=0)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[num_val:].sort().values.tolist(), order[:num_val].sort().values.tolist()


@dataclass
class FittedCodes:
    """What ``fit_code_dataset`` wrote: the codebook, the code dataset and its split, the figures."""

    codebook: Codebook
    dataset: CodeDataset
    train: Subset  # the items the codebook was fitted on (all of them without a split)
    val: Subset | None  # held out of the fit; None when val_fraction is 0
    metrics: dict[str, Any]

    @property
    def train_indices(self) -> list[int]:
        return list(self.train.indices)

    @property
    def val_indices(self) -> list[int]:
        return [] if self.val is None else list(self.val.indices)


def fit_code_dataset(out_dir: str | os.PathLike[str], vectors: torch.Tensor, labels: torch.Tensor | None = None, *,
                     num_codes: int, val_fraction: float = 0.0, seed: int = 0, metric: str = "euclidean",
                     num_classes: int | None = None, class_names: list[str] | None = None, description: str = "",
                     codebook_description: str = "", progress: bool = False,
                     kmeans: Mapping[str, Any] | None = None) -> FittedCodes:
    """Fit a k-means codebook, encode every item, write ``out_dir/codebook`` and ``out_dir/data``.

    The one path from latents to a code dataset (``codegpt fit-codebook``, the digits, the demo).

    Args:
        vectors: latents (N, H, W, D), one D-dimensional vector per code position.
        labels: class ids (N,), or None for an unconditional dataset.
        val_fraction: the part held out of the fit (``split_indices(N, val_fraction, seed)``, the
            split ``CodeDataset.split`` gives later); 0 fits on every item.
        seed: seeds k-means and the split.
        num_classes: default ``labels.max() + 1`` (0 without labels).
        kmeans: more keyword arguments of ``Codebook.fit`` (``batch_size``, ``max_epochs``, ``tol``, ...).

    Metrics: ``mse`` (over all items), ``mse_fit``, ``mse_held_out`` (with a split), ``perplexity``,
    ``dead_codes`` and ``top_code_share`` (code usage over all items), ``fit_seconds``, ``num_images``, ``grid``.
    """
    vectors = as_tensor("vectors", vectors)
    if vectors.ndim != 4:
        raise ValueError(f"vectors must have shape (N, H, W, D), got {tuple(vectors.shape)}")
    if num_classes is None:
        num_classes = 0 if labels is None else int(labels.max()) + 1
    out_dir, n = Path(out_dir), vectors.shape[0]
    train_idx, val_idx = split_indices(n, val_fraction, seed) if val_fraction else (list(range(n)), [])
    fit_on = vectors[torch.tensor(train_idx)] if val_idx else vectors
    codebook = Codebook.fit(fit_on, num_codes, metric=metric, seed=seed, progress=progress,
                            description=codebook_description,
                            **(kmeans or {}))
    codes = codebook.encode(vectors)  # (N, H, W)
    # The split is recorded so that `codegpt train` and `codegpt eval` hold out the same items unasked.
    path = write_code_dataset(
        out_dir / "data", codes, labels, codebook_size=num_codes, num_classes=num_classes,
        class_names=class_names, overwrite=True, description=description,
        metadata={"codebook": "../codebook", "split": {"val_fraction": val_fraction, "seed": seed}},
    )
    codebook.save_pretrained(out_dir / "codebook")

    stats, fit_seconds = codebook.stats(vectors), codebook.fit_info.seconds  # type: ignore[union-attr]
    metrics: dict[str, Any] = {"mse": stats.mse, "fit_seconds": fit_seconds, "perplexity": stats.perplexity,
                               "dead_codes": stats.dead_codes, "num_images": n, "grid": tuple(codes.shape[1:]),
                               "top_code_share": int(stats.counts.max()) / stats.num_vectors}
    dataset = CodeDataset(path)
    if val_idx:
        metrics["mse_fit"] = codebook.stats(fit_on).mse
        metrics["mse_held_out"] = codebook.stats(vectors[torch.tensor(val_idx)]).mse
    val = Subset(dataset, val_idx) if val_idx else None
    return FittedCodes(codebook, dataset, Subset(dataset, train_idx), val, metrics)


def load_code_dataset(path: str | os.PathLike[str], verify: bool = False) -> CodeDataset:
    """Open (and validate) the code dataset in `path`; `verify` also checks every shard's SHA-256."""
    return CodeDataset(path, verify=verify)


def _read_metadata(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise FileNotFoundError(f"code dataset folder {path} does not exist")
    file = path / METADATA_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: {path} is not a code dataset, or its writing did not finish")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(meta).__name__}")
    check_format(file, meta, FORMAT, FORMAT_VERSION)
    try:
        _check_vocabulary("codebook_size", meta.get("codebook_size"), low=1)
        _check_vocabulary("num_classes", meta.get("num_classes"), low=0)
        meta["grid"] = _check_grid(meta.get("grid"))
        _check_class_names(meta.get("class_names"), meta["num_classes"])
        shards = meta.get("shards")
        if not isinstance(shards, list) or not shards:
            raise ValueError(f"shards must be a non-empty list, got {shards!r}")
        seen: set[str] = set()
        for shard in shards:
            name = shard.get("file") if isinstance(shard, dict) else None
            # Plain file names only: metadata must not point outside the dataset folder.
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise ValueError(f"each shard needs a plain file name, got {shard!r}")
            if name in seen:
                raise ValueError(f"shard {str(path / name)!r} is listed twice")
            seen.add(name)
            check_int(f"num_items of {name}", shard.get("num_items"), low=1)
            # Records are all or none: a dataset half with and half without them was edited by hand.
            if ("bytes" in shard) != ("bytes" in shards[0]):
                raise ValueError(f"shard {name} {'has' if 'bytes' in shard else 'lacks'} a size record "
                                 f"and shard {shards[0]['file']} does not")
        total = sum(shard["num_items"] for shard in shards)
        if meta.get("num_items", total) != total:
            raise ValueError(f"num_items is {meta.get('num_items')} but the shards hold {total}")
    except (TypeError, ValueError) as err:
        raise ValueError(f"{file}: {err}") from None
    return meta


def _validate_shard(file: Path, num_items: int, first_item: int, meta: dict[str, Any]
                    ) -> tuple[int, np.dtype, np.ndarray | None]:
    """Check one shard completely; return where its codes start, their dtype, and its labels."""
    if not file.is_file():
        raise FileNotFoundError(f"shard {file} listed in {METADATA_NAME} is missing")
    try:
        # safe_open checks the header and that the tensors exactly cover the file.
        with safe_open(file, framework="np") as handle:
            names = set(handle.keys())
    except SafetensorError as err:
        raise ValueError(f"{file} is not a valid safetensors file (truncated or foreign?): {err}") from None
    # safe_open has validated the header; its byte layout is needed for the memory maps.
    with open(file, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_len))
    grid = meta["grid"]
    wanted = ["codes"] + (["labels"] if meta["num_classes"] > 0 else [])
    for name in wanted:
        if name not in names:
            raise ValueError(f"{file} has no tensor {name!r} (it holds {sorted(names)})")
        dtype = header[name]["dtype"]
        if dtype not in _INT_DTYPES:
            raise ValueError(f"{file}: {name} must be an integer tensor, got dtype {dtype}")
    shape = tuple(header["codes"]["shape"])
    if len(shape) != 3 or shape[1:] != grid:
        raise ValueError(f"{file}: codes have shape {shape}, expected (n, H, W) with grid "
                         f"{grid} as {METADATA_NAME} says")
    if shape[0] != num_items:
        raise ValueError(f"{file} holds {shape[0]} items but {METADATA_NAME} says {num_items}")
    data_start = 8 + header_len
    codes_dtype = np.dtype(_INT_DTYPES[header["codes"]["dtype"]])
    codes_offset = data_start + header["codes"]["data_offsets"][0]
    where = f"{file.name} row {{row}} (item {{item}})"
    # num_items >= 1: the metadata check saw to it.
    codes = np.memmap(file, dtype=codes_dtype, mode="r", offset=codes_offset, shape=(num_items, grid[0] * grid[1]))
    step = max(1, _SCAN_ELEMENTS // codes.shape[1])
    for begin in range(0, num_items, step):
        _check_range(codes[begin:begin + step], meta["codebook_size"], "code", where, first_item, begin, grid)
    del codes
    labels = None
    if "labels" in wanted:
        entry = header["labels"]
        if tuple(entry["shape"]) != (num_items,):
            raise ValueError(f"{file}: labels have shape {tuple(entry['shape'])}, expected ({num_items},)")
        raw = np.fromfile(file, dtype=np.dtype(_INT_DTYPES[entry["dtype"]]), count=num_items,
                          offset=data_start + entry["data_offsets"][0])
        labels = raw.astype(np.int64)
        _check_range(labels.reshape(-1, 1), meta["num_classes"], "label", where, first_item)
    return codes_offset, codes_dtype, labels


def _check_range(values: Any, size: int, what: str, where: str, first_item: int,
                 row_offset: int = 0, grid: tuple[int, int] | None = None) -> None:
    """Raise naming the first row of `values` (rows, columns) holding a value outside [0, size).

    `where` is a template with {row} and {item}; rows count from `row_offset`, items from
    `first_item + row_offset`.
    """
    array = values.numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if array.size == 0 or (array.min() >= 0 and array.max() < size):
        return
    bad = (array < 0) | (array >= size)
    row, column = (int(i) for i in np.argwhere(bad)[0])
    value = int(array[row, column])
    row += row_offset
    position = "" if grid is None else f" at {divmod(column, grid[1])}"
    place = where.format(row=row, item=first_item + row)
    raise ValueError(f"{place}: {what} {value}{position} outside [0, {size})")


def _check_vocabulary(name: str, value: Any, low: int) -> None:
    if check_int(name, value, low=low) > MAX_VOCABULARY:
        raise ValueError(f"{name} {value} is absurd: more than {MAX_VOCABULARY} (2**24)")


def _check_grid(grid: Any) -> tuple[int, int]:
    if not isinstance(grid, (list, tuple)) or len(grid) != 2:
        raise ValueError(f"grid must be (H, W), got {grid!r}")
    return check_int("grid", grid[0], low=1), check_int("grid", grid[1], low=1)


def _check_class_names(names: Any, num_classes: int) -> list[str] | None:
    if names is None:
        return None
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"class_names must be a list of str, got {names!r}")
    if len(names) != num_classes:
        raise ValueError(f"class_names must have num_classes={num_classes} entries, got {len(names)}")
    return list(names)
