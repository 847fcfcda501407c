"""Images to code datasets: image sources, conversion, and the streamed encoding pipeline.

Sources (each knows its length, its class names and a name for every item, for error messages):

- `FolderSource(root)`: one subfolder per class (`root/cat/001.png`, ...; classes sorted by
  name), or image files directly in `root` (unlabelled).
- `DatasetSource(data, image_column=..., label_column=...)`: a Hugging Face `datasets` data set:
  a `datasets.Dataset`, a folder written by `save_to_disk`, or a name `load_dataset` understands
  (a Hub id, "imagefolder" with `data_dir=`, ...); `codegpt[images]`.
- `ArraySource(images, labels)`: arrays in memory: uint8 (N, H, W) or (N, H, W, C) in the
  numpy/PIL layout, converted like files; or float (N, C, H, W) in [0, 1] already of the
  autoencoder's size.

Conversion (`convert_image`): to the autoencoder's mode (1 channel "L", 3 "RGB", 4 "RGBA"), then to
its size: `resize="crop"` scales the shorter side and crops the centre (the default), "stretch"
scales both sides, "refuse" raises for an image of another size. Values become float32 in [0, 1].

The pipeline (`encode_images`): images -> autoencoder latents -> post-hoc `Codebook.fit` on the
training split's latents -> codes -> `train/` and `val/` code datasets. Images are read and encoded
once, in batches (memory bounded by the batch, not the set), with the latents kept in
files on disk until the codes are written. Under `accelerate launch` each process encodes its share
of the batches and the main process fits the codebook and writes the datasets, which are then
identical to a one-process run's. An unreadable image file raises naming the file
(`on_error="raise"`, the default) or is skipped with a warning naming it (`on_error="skip"`; the
skipped files are listed in `encoding.json`). Nothing lands in `out_dir` unless everything
succeeded: the work happens in `out_dir/.encode-partial/`, and `encoding.json`, written last, marks
a complete folder::

    out_dir/
      codebook/       the codebook; its config.json records the autoencoder ("autoencoder")
      train/ val/     code datasets (codegpt.data); each dataset.json records the autoencoder, the
                      codebook ("../codebook"), its part of the split and the source
      source_indices.safetensors   "train", "val": the source item each code grid came from
      encoding.json   source, autoencoder spec, split, counts, skipped files, codebook usage
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .autoencoders import Autoencoder, check_autoencoder, load_autoencoder
from .codebook import Codebook
from .data import CodeDatasetWriter

__all__ = [
    "ArraySource",
    "DatasetSource",
    "EncodeResult",
    "FolderSource",
    "ImageReadError",
    "ImageSource",
    "check_prior",
    "convert_image",
    "decode_codes",
    "encode_images",
    "image_decoder",
    "iter_image_batches",
    "load_encoding",
    "load_source_indices",
    "source_from_record",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
RESIZE_MODES = ("crop", "stretch", "refuse")
ON_ERROR = ("raise", "skip")
ENCODING_NAME = "encoding.json"
INDICES_NAME = "source_indices.safetensors"  # tensors "train", "val": the source item of each code grid
PARTIAL_NAME = ".encode-partial"
FORMAT = "codegpt.encoding"
FORMAT_VERSION = 1
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


class ImageReadError(ValueError):
    """An image file (or data set row) that cannot be read; the message names it."""


# ---------------------------------------------------------------------- sources


class ImageSource:
    """N images with optional class labels. Subclasses implement `load`, `label` and `name`."""

    class_names: list[str] | None = None
    description: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.class_names is not None else 0

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> Image.Image | np.ndarray | torch.Tensor:
        """Item `index` as read (raises `ImageReadError` naming it when it cannot be read)."""
        raise NotImplementedError

    def label(self, index: int) -> int:
        """The class id of item `index` (-1 for an unlabelled source)."""
        return -1

    def name(self, index: int) -> str:
        return f"item {index}"

    def record(self) -> dict[str, Any]:
        """What this source was, for encoding.json."""
        return {"type": type(self).__name__, "description": self.description, "num_items": len(self)}


class FolderSource(ImageSource):
    """Images in `root/<class>/<file>` (labelled; classes sorted by folder name) or `root/<file>`
    (unlabelled). Files whose extension is not in `extensions` and hidden files are ignored."""

    def __init__(self, root: str | os.PathLike[str], extensions: Sequence[str] = IMAGE_EXTENSIONS) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist or is not a folder")
        extensions = tuple(e.lower() for e in extensions)

        def images_in(folder: Path) -> list[str]:
            return sorted(e.name for e in os.scandir(folder) if e.is_file() and not e.name.startswith(".")
                          and os.path.splitext(e.name)[1].lower() in extensions)

        classes = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        loose = images_in(self.root)
        if classes and loose:
            raise ValueError(f"{self.root} holds both class folders ({classes[0].name}, ...) and image files "
                             f"({loose[0]}, ...): use one layout, root/<class>/<file> or root/<file>")
        # Paths relative to root as one bytes array and labels as int32: a few dozen bytes per image,
        # where a list of Path objects takes ~350 (this listing is the one thing that grows with the set).
        names: list[bytes] = []
        labels: list[np.ndarray] = []
        if classes:
            self.class_names = [c.name for c in classes]
            for label, folder in enumerate(classes):
                found = images_in(folder)
                names += [os.fsencode(os.path.join(folder.name, name)) for name in found]
                labels.append(np.full(len(found), label, np.int32))
        else:
            self.class_names = None
            names = [os.fsencode(name) for name in loose]
            labels.append(np.full(len(loose), -1, np.int32))
        if not names:
            raise ValueError(f"{self.root} holds no image files (extensions {', '.join(extensions)})")
        self._names = np.array(names, dtype=bytes)
        self.labels = np.concatenate(labels)
        self.description = f"image folder {self.root}"

    def __len__(self) -> int:
        return len(self._names)

    def path(self, index: int) -> Path:
        """The file of item `index`."""
        return self.root / os.fsdecode(self._names[index])

    def load(self, index: int) -> Image.Image:
        path = self.path(index)
        try:
            with Image.open(path) as image:
                image.load()  # decode now: a truncated file fails here, not later in a worker
                return image
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
            raise ImageReadError(f"{path}: cannot read the image ({err})") from None

    def label(self, index: int) -> int:
        return int(self.labels[index])

    def name(self, index: int) -> str:
        return str(self.path(index))

    def record(self) -> dict[str, Any]:
        return {**super().record(), "root": str(self.root.resolve())}


class DatasetSource(ImageSource):
    """A Hugging Face `datasets` data set (see the module docstring).

    Args:
        data: a `datasets.Dataset`, a `save_to_disk` folder, or a name for `datasets.load_dataset`.
        split: the split to load when `data` is a name.
        image_column: the column holding images (decoded to PIL by `datasets`).
        label_column: the column holding class ids, or None for unlabelled images. Its class names
            come from a `ClassLabel` feature, else they are "0", "1", ... up to the largest id.
        revision: the Hub revision when `data` is a Hub id.
        load_kwargs: further arguments for `load_dataset` (e.g. `data_dir=`).
    """

    def __init__(self, data: Any, *, split: str = "train", image_column: str = "image",
                 label_column: str | None = "label", revision: str | None = None, **load_kwargs: Any) -> None:
        try:
            import datasets
        except ImportError as err:
            raise ImportError("Hugging Face data sets need datasets: pip install 'codegpt[images]'") from err
        if isinstance(data, (str, os.PathLike)):
            name = os.fspath(data)
            if os.path.isdir(name) and os.path.isfile(os.path.join(name, "state.json")):
                data = datasets.load_from_disk(name)
            else:
                data = datasets.load_dataset(name, split=split, revision=revision, **load_kwargs)
            self.description = f"datasets {name} split {split}" + (f" revision {revision}" if revision else "")
            if os.path.isdir(name):
                name = os.path.abspath(name)
            # Folders as absolute paths: evaluation may run from elsewhere.
            self._reopen = {"data": name, "split": split, "revision": revision,
                            "load_kwargs": {k: os.path.abspath(v) if os.path.isdir(v) else os.fspath(v)
                                            for k, v in load_kwargs.items() if isinstance(v, (str, os.PathLike))}}
        else:
            self.description = f"datasets.Dataset {getattr(data, 'info', None) and data.info.dataset_name or ''}"
            self._reopen = {}  # an in-memory data set cannot be read again from a record
        if isinstance(data, datasets.DatasetDict):
            raise ValueError(f"data is a DatasetDict with splits {list(data)}: pick one (split=...)")
        if not isinstance(data, datasets.Dataset):
            raise TypeError(f"data must be a datasets.Dataset, a folder or a name, got {type(data).__name__}")
        columns = list(data.column_names)
        for what, column in (("image_column", image_column), ("label_column", label_column)):
            if column is not None and column not in columns:
                raise ValueError(f"{what} {column!r} is not a column of the data set; its columns are {columns}")
        self.data, self.image_column, self.label_column = data, image_column, label_column
        self.labels: np.ndarray | None = None
        if label_column is not None:
            feature = data.features[label_column]
            labels = data[label_column]  # one column: ints, small beside the images
            bad = [i for i, v in enumerate(labels) if isinstance(v, bool) or not isinstance(v, int) or v < 0]
            if bad:
                raise ValueError(f"label_column {label_column!r} must hold class ids >= 0; row {bad[0]} holds "
                                 f"{labels[bad[0]]!r}")
            if isinstance(feature, datasets.ClassLabel):
                self.class_names = list(feature.names)
            else:
                self.class_names = [str(i) for i in range(max(labels) + 1)] if labels else None
            self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.data)

    def load(self, index: int) -> Image.Image:
        try:
            image = self.data[index][self.image_column]
            if isinstance(image, Image.Image):
                image.load()
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
            raise ImageReadError(f"{self.name(index)}: cannot read the image ({err})") from None
        if not isinstance(image, (Image.Image, np.ndarray)):
            raise ImageReadError(f"{self.name(index)}: column {self.image_column!r} holds "
                                 f"{type(image).__name__}, not an image")
        return image

    def label(self, index: int) -> int:
        return -1 if self.labels is None else int(self.labels[index])

    def name(self, index: int) -> str:
        return f"{self.description.strip()} row {index}"

    def record(self) -> dict[str, Any]:
        # data/split/revision/load_kwargs (a name or folder given) let evaluation read the images again.
        return {**super().record(), "image_column": self.image_column, "label_column": self.label_column,
                **self._reopen}


class ArraySource(ImageSource):
    """Images in memory (see the module docstring) with optional labels (N,) and class names."""

    def __init__(self, images: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray | None = None,
                 class_names: Sequence[str] | None = None, num_classes: int | None = None) -> None:
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().numpy()
        if not isinstance(images, np.ndarray):
            raise TypeError(f"images must be a numpy array or torch tensor, got {type(images).__name__}")
        if images.dtype == np.uint8:
            if images.ndim not in (3, 4):
                raise ValueError(f"uint8 images must have shape (N, H, W) or (N, H, W, C), got {images.shape}")
        elif np.issubdtype(images.dtype, np.floating):
            if images.ndim != 4:
                raise ValueError(f"float images must have shape (N, C, H, W), got {images.shape}")
        else:
            raise TypeError(f"images must be uint8 (0-255) or float (0-1), got dtype {images.dtype}")
        self.images = images
        if labels is not None:
            labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
            if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
                raise ValueError(f"labels must be integers of shape ({len(images)},), got {labels.dtype} "
                                 f"{labels.shape}")
            if len(labels) and labels.min() < 0:
                raise ValueError(f"labels must be >= 0, got {int(labels.min())}")
            count = num_classes if num_classes is not None else (
                len(class_names) if class_names is not None else int(labels.max()) + 1 if len(labels) else 0)
            if len(labels) and labels.max() >= count:
                raise ValueError(f"labels must be < num_classes={count}, got {int(labels.max())}")
            self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(count)]
            if len(self.class_names) != count:
                raise ValueError(f"class_names must have {count} entries, got {len(self.class_names)}")
        self.labels = labels
        self.description = f"arrays {images.dtype} {tuple(images.shape)}"

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> np.ndarray:
        return self.images[index]

    def label(self, index: int) -> int:
        return -1 if self.labels is None else int(self.labels[index])

    def name(self, index: int) -> str:
        return f"images[{index}]"


# ---------------------------------------------------------------------- conversion


def convert_image(image: Image.Image | np.ndarray | torch.Tensor, size: tuple[int, int], channels: int,
                  resize: str = "crop", name: str = "image") -> torch.Tensor:
    """One image -> float32 (channels, H, W) in [0, 1] of `size` (H, W); see the module docstring.

    uint8 arrays (H, W) or (H, W, C) go through PIL like files; float arrays (C, H, W) must already
    have the right size and channels. Errors name the image (`name`).
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    height, width = size
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray) and np.issubdtype(image.dtype, np.floating):
        if image.shape != (channels, height, width):
            raise ValueError(f"{name}: float images must already have shape (C, H, W) = {(channels, height, width)}, "
                             f"got {image.shape}")
        if not (image.min() >= 0 and image.max() <= 1):
            raise ValueError(f"{name}: float images must hold values in [0, 1], got [{image.min()}, {image.max()}]")
        return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in _MODES):
            raise ValueError(f"{name}: arrays must be uint8 (H, W) or (H, W, C) with C in (1, 3, 4), "
                             f"got {image.dtype} {image.shape}")
        image = Image.fromarray(image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"{name}: not an image ({type(image).__name__})")
    if channels not in _MODES:
        raise ValueError(f"channels must be one of {sorted(_MODES)} to convert images, got {channels}")
    mode = _MODES[channels]
    if image.mode != mode:
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            # PIL's "I" -> "L" clips at 255; 16-bit images are scaled instead.
            image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))
        try:
            image = image.convert(mode)
        except (ValueError, OSError) as err:
            raise ValueError(f"{name}: cannot convert mode {image.mode} to {mode} ({err})") from None
    if image.size != (width, height):
        if resize == "refuse":
            raise ValueError(f"{name}: size {image.size[1]}x{image.size[0]} (HxW) is not the autoencoder's "
                             f"{height}x{width}; pass resize='crop' or 'stretch' to convert it")
        if resize == "crop":
            scale = max(height / image.size[1], width / image.size[0])
            scaled = (max(width, round(image.size[0] * scale)), max(height, round(image.size[1] * scale)))
            image = image.resize(scaled, Image.Resampling.BICUBIC)
            left, top = (scaled[0] - width) // 2, (scaled[1] - height) // 2
            image = image.crop((left, top, left + width, top + height))
        else:
            image = image.resize((width, height), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)
    array = array[:, :, None] if array.ndim == 2 else array
    return torch.from_numpy(array.transpose(2, 0, 1).astype(np.float32) / 255.0)


class _Converted(torch.utils.data.Dataset):
    """A source's items converted for one autoencoder: (image (C, H, W), label, index), or a skip
    record (None, name, reason) for an unreadable item when skipping."""

    def __init__(self, source: ImageSource, size: tuple[int, int], channels: int, resize: str, on_error: str):
        self.source, self.size, self.channels, self.resize, self.on_error = source, size, channels, resize, on_error

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[Any, Any, Any]:
        try:
            image = self.source.load(index)
        except ImageReadError as err:
            if self.on_error == "raise":
                raise
            return None, self.source.name(index), str(err)
        image = convert_image(image, self.size, self.channels, self.resize, self.source.name(index))
        return image, self.source.label(index), index


def _collate(items: list[tuple[Any, Any, Any]]) -> dict[str, Any]:
    kept = [item for item in items if item[0] is not None]
    skipped = [{"name": name, "reason": reason} for image, name, reason in items if image is None]
    if not kept:
        return {"images": None, "labels": None, "indices": None, "skipped": skipped}
    return {
        "images": torch.stack([item[0] for item in kept]),
        "labels": torch.tensor([item[1] for item in kept], dtype=torch.long),
        "indices": torch.tensor([item[2] for item in kept], dtype=torch.long),
        "skipped": skipped,
    }


def iter_image_batches(source: ImageSource, autoencoder: Autoencoder, batch_size: int = 64, *,
                       batches: Sequence[Sequence[int]] | None = None, resize: str = "crop",
                       on_error: str = "raise", num_workers: int = 0, progress: bool = False,
                       ) -> Iterator[dict[str, Any]]:
    """Converted images in batches: dicts with `images` (B, C, H, W) in [0, 1] (None when the whole
    batch was skipped), `labels` (B,) (-1 when unlabelled), `indices` (B,) into the source, and
    `skipped` ([{name, reason}]). `batches` (lists of indices) default to consecutive runs of
    `batch_size`; `num_workers` > 0 decodes files in DataLoader worker processes."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if batches is None:
        batches = [range(b, min(b + batch_size, len(source))) for b in range(0, len(source), batch_size)]
    dataset = _Converted(source, autoencoder.image_size, autoencoder.channels, resize, on_error)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=_collate,
                                         num_workers=num_workers)
    total = sum(len(b) for b in batches)
    with tqdm(total=total, desc="encode", unit="img", disable=not progress) as bar:
        for batch in loader:
            for skip in batch["skipped"]:
                logger.warning("skipped %s", skip["reason"])
            bar.update(len(batch["skipped"]) + (0 if batch["images"] is None else len(batch["images"])))
            yield batch


# ---------------------------------------------------------------------- the pipeline


@dataclass
class EncodeResult:
    """What `encode_images` wrote (paths) and measured."""

    out_dir: Path
    codebook: Codebook
    train: Path
    val: Path | None
    record: dict[str, Any] = field(default_factory=dict)  # the contents of encoding.json


def encode_images(
    source: ImageSource,
    autoencoder: Autoencoder,
    out_dir: str | os.PathLike[str],
    *,
    num_codes: int = 512,
    codebook: Codebook | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    batch_size: int = 64,
    resize: str = "crop",
    on_error: str = "raise",
    num_workers: int = 0,
    kmeans: dict[str, Any] | None = None,
    keep_latents: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> EncodeResult:
    """Encode `source` with `autoencoder` into a codebook and train/val code datasets in `out_dir`.

    Args:
        source: the images (`FolderSource`, `DatasetSource`, `ArraySource`).
        autoencoder: any `Autoencoder`.
        out_dir: the output folder (layout in the module docstring).
        num_codes: size of the post-hoc codebook fitted on the training split's latents.
        codebook: use this codebook instead of fitting one (e.g. `DiffusersAutoencoder.own_codebook()`
            for a VQModel's own codes); its `dim` must be the autoencoder's `latent_dim`.
        val_fraction: share of the (readable) images held out in `val/`, drawn at random with
            `seed` exactly as `CodeDataset.split(val_fraction, seed)` draws; 0 writes `train/` only.
        seed: seeds the split and the k-means fit.
        batch_size: images per autoencoder forward pass.
        resize, on_error: see the module docstring.
        num_workers: DataLoader workers reading and converting images.
        kmeans: further `Codebook.fit` arguments (batch_size, max_epochs, ...).
        keep_latents: keep the latents (`out_dir/latents/latents-*.npy`) for another codebook.
        overwrite: replace a complete encoding already in `out_dir`.
        progress: progress bars.

    Returns an `EncodeResult` (in every process under `accelerate launch`).
    """
    from accelerate import PartialState

    _check_arguments(autoencoder, codebook, num_codes, val_fraction, seed, batch_size, resize, on_error)
    out_dir = Path(out_dir)
    if (out_dir / ENCODING_NAME).exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already holds an encoding; pass overwrite=True to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} exists and is not a folder")
    if len(source) == 0:
        raise ValueError("the image source is empty")
    state = PartialState(cpu=autoencoder.device.type == "cpu")
    rank, world = state.process_index, state.num_processes
    work = out_dir / PARTIAL_NAME
    if state.is_main_process:
        shutil.rmtree(work, ignore_errors=True)  # a run cut short before
        work.mkdir(parents=True)
    state.wait_for_everyone()

    # Each process encodes a contiguous run of whole batches, so every image meets the same batch
    # (and so the same arithmetic) whatever the number of processes.
    batches = [range(b, min(b + batch_size, len(source))) for b in range(0, len(source), batch_size)]
    mine = batches[len(batches) * rank // world:len(batches) * (rank + 1) // world]
    _together(state, work, lambda: _encode_share(source, autoencoder, mine, work, rank, resize, on_error,
                                                 num_workers, progress and state.is_main_process))

    result_holder: list[EncodeResult] = []

    def finish() -> None:
        result_holder.append(_write_outputs(source, autoencoder, out_dir, work, world, codebook, num_codes,
                                            val_fraction, seed, batch_size, kmeans or {}, keep_latents, progress))

    _together(state, work, finish if state.is_main_process else lambda: None)
    if state.is_main_process:
        shutil.rmtree(work, ignore_errors=True)
        return result_holder[0]
    record = json.loads((out_dir / ENCODING_NAME).read_text())
    return EncodeResult(out_dir, Codebook.from_pretrained(out_dir / "codebook"), out_dir / "train",
                        out_dir / "val" if record["split"]["num_val"] else None, record)


def _check_arguments(autoencoder: Autoencoder, codebook: Codebook | None, num_codes: int, val_fraction: float,
                     seed: int, batch_size: int, resize: str, on_error: str) -> None:
    if not isinstance(autoencoder, Autoencoder):
        raise TypeError(f"autoencoder must be a codegpt.autoencoders.Autoencoder, got {type(autoencoder).__name__}")
    if codebook is not None:
        if codebook.dim != autoencoder.latent_dim:
            raise ValueError(f"codebook dim {codebook.dim} does not match the autoencoder's latent_dim "
                             f"{autoencoder.latent_dim} ({autoencoder!r})")
    elif isinstance(num_codes, bool) or not isinstance(num_codes, int) or num_codes < 1:
        raise ValueError(f"num_codes must be an int >= 1, got {num_codes!r}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")


def _together(state: Any, work: Path, step: Any) -> None:
    """Run `step` in every process; if it fails in any, all of them raise (none waits forever)."""
    error: BaseException | None = None
    try:
        step()
    except Exception as err:  # noqa: BLE001 - re-raised below, after the others know
        error = err
        (work / f"error-{state.process_index}.txt").write_text(f"{type(err).__name__}: {err}")
    state.wait_for_everyone()
    failed = sorted(work.glob("error-*.txt"))
    state.wait_for_everyone()  # every process has looked before the main one clears the work folder
    if failed and state.is_main_process:
        shutil.rmtree(work, ignore_errors=True)
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"encoding failed in another process: {failed[0].read_text()}")


def _encode_share(source: ImageSource, autoencoder: Autoencoder, batches: list[range], work: Path, rank: int,
                  resize: str, on_error: str, num_workers: int, progress: bool) -> None:
    """Encode this process's batches into work/latents-<rank>.npy, with labels and source indices, and a
    part-<rank>.json that says how many. Memory stays one batch large whatever the number of images:
    latents are appended to the file (not a memory map, whose written pages stay in this process's
    resident memory until it is closed), and labels and indices go into arrays allocated once (small
    per-batch arrays kept alive between the batches' large ones fragment the heap: measured, the
    resident memory grew by about one batch of images for every batch)."""
    h, w = autoencoder.latent_grid
    capacity = sum(len(b) for b in batches)
    shape = (max(capacity, 1), h, w, autoencoder.latent_dim)
    labels, indices = np.zeros(capacity, np.int64), np.zeros(capacity, np.int64)
    skipped, count = [], 0
    with open(work / f"latents-{rank:05d}.npy", "wb") as file:
        np.lib.format.write_array_header_1_0(file, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                                                    "fortran_order": False, "shape": shape})
        for batch in iter_image_batches(source, autoencoder, batches=batches, resize=resize, on_error=on_error,
                                        num_workers=num_workers, progress=progress):
            skipped += batch["skipped"]
            if batch["images"] is None:
                continue
            n = len(batch["images"])
            file.write(autoencoder.encode(batch["images"]).numpy().astype(np.float32, copy=False).tobytes())
            labels[count:count + n] = batch["labels"].numpy()
            indices[count:count + n] = batch["indices"].numpy()
            count += n
        file.truncate(file.tell() + (shape[0] - count) * h * w * autoencoder.latent_dim * 4)  # skipped rows: zeros
    np.save(work / f"labels-{rank:05d}.npy", labels[:count])
    np.save(work / f"indices-{rank:05d}.npy", indices[:count])
    (work / f"part-{rank:05d}.json").write_text(json.dumps({"count": count, "skipped": skipped}))


def _read_latents(path: Path, rows: np.ndarray) -> np.ndarray:
    """Rows `rows` (sorted integers) of a latents file, read run by run. Not through a memory map: the
    pages read through one count in the process's resident memory until it is closed."""
    with open(path, "rb") as file:
        np.lib.format.read_magic(file)
        shape, _, dtype = np.lib.format.read_array_header_1_0(file)
        start, row = file.tell(), math.prod(shape[1:])
        out = np.empty((len(rows), *shape[1:]), dtype)
        done = 0
        for run in np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1):  # consecutive rows: one read
            file.seek(start + int(run[0]) * row * dtype.itemsize)
            out[done:done + len(run)] = np.fromfile(file, dtype, len(run) * row).reshape(len(run), *shape[1:])
            done += len(run)
    return out


def _write_outputs(source: ImageSource, autoencoder: Autoencoder, out_dir: Path, work: Path, world: int,
                   codebook: Codebook | None, num_codes: int, val_fraction: float, seed: int, batch_size: int,
                   kmeans: dict[str, Any], keep_latents: bool, progress: bool) -> EncodeResult:
    """Main process: split, fit the codebook on the training latents, write the code datasets, then
    move everything into out_dir, encoding.json last."""
    parts = [json.loads((work / f"part-{rank:05d}.json").read_text()) for rank in range(world)]
    skipped = [s for meta in parts for s in meta["skipped"]]
    total = sum(meta["count"] for meta in parts)
    if total == 0:
        raise ValueError(f"no image could be read ({len(skipped)} skipped, first: {skipped[0]['reason']})"
                         if skipped else "no image to encode")
    is_val = np.zeros(total, dtype=bool)
    num_val = round(val_fraction * total)
    if val_fraction > 0:
        if not 0 < num_val < total:
            raise ValueError(f"val_fraction={val_fraction} leaves an empty part of {total} images")
        # The same draw as CodeDataset.split(val_fraction, seed), so train and eval agree on it.
        order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
        is_val[order[:num_val].numpy()] = True
    num_train = total - num_val
    offsets = np.cumsum([0] + [meta["count"] for meta in parts])

    def gather(index: np.ndarray) -> np.ndarray:
        """Latent rows `index` (sorted) of the whole set, gathered across the parts' files."""
        out = []
        for rank, (start, stop) in enumerate(zip(offsets[:-1], offsets[1:], strict=True)):
            chosen = index[(index >= start) & (index < stop)] - start
            if len(chosen):
                out.append(_read_latents(work / f"latents-{rank:05d}.npy", chosen))
        return out[0] if len(out) == 1 else np.concatenate(out)

    h, w = autoencoder.latent_grid
    kmeans = dict(kmeans)
    if codebook is None:
        train_rows = np.flatnonzero(~is_val)
        images_per_batch = max(1, int(kmeans.pop("batch_size", 4096)) // (h * w))
        generator = np.random.default_rng(seed)

        def epoch() -> Iterator[torch.Tensor]:
            # Shuffled over the whole training split: k-means++ seeds from the first vectors.
            order = generator.permutation(train_rows)
            for begin in range(0, len(order), images_per_batch):
                chosen = np.sort(order[begin:begin + images_per_batch])
                yield torch.from_numpy(gather(chosen)).reshape(-1, autoencoder.latent_dim)

        kmeans.setdefault("progress", progress)
        codebook = Codebook.fit(epoch, num_codes, seed=seed, description=_describe(autoencoder, source), **kmeans)
    spec = autoencoder.spec()

    # The codes, in source order, each image to its part of the split.
    labels_all = np.concatenate([np.load(work / f"labels-{rank:05d}.npy") for rank in range(world)])
    # Which source item each code grid came from, so evaluation can read the real held-out images.
    source_index = torch.from_numpy(np.concatenate([np.load(work / f"indices-{rank:05d}.npy")
                                                    for rank in range(world)]).astype(np.int64))
    save_file({"train": source_index[torch.from_numpy(~is_val)].contiguous(),
               "val": source_index[torch.from_numpy(is_val)].contiguous()}, str(work / INDICES_NAME))
    usage = {"train": _Usage(codebook.num_codes), "val": _Usage(codebook.num_codes)}
    common = {"codebook_size": codebook.num_codes, "num_classes": source.num_classes,
              "class_names": source.class_names, "grid": (h, w),
              "description": f"{source.description}; {_describe(autoencoder, source)}"}
    # Each part records what made its codes and its place in the split: the codebook beside it, the
    # autoencoder (so decoding needs no flags and refuses another one), the split and the source.
    split = {"val_fraction": val_fraction, "seed": seed, "num_train": num_train, "num_val": num_val}

    def metadata(part: str) -> dict[str, Any]:
        return {"autoencoder": spec, "codebook": "../codebook", "split": {"part": part, **split},
                "source": source.record()}

    writers = {"train": CodeDatasetWriter(work / "train", **common, metadata=metadata("train"))}
    if num_val:
        writers["val"] = CodeDatasetWriter(work / "val", **common, metadata=metadata("val"))
    try:
        # Batch by batch, as they were encoded: every temporary here is one batch large.
        for begin in range(0, total, batch_size):
            end = min(total, begin + batch_size)
            latents = torch.from_numpy(gather(np.arange(begin, end)))
            codes = codebook.encode(latents)  # (n, h, w)
            labels = torch.from_numpy(labels_all[begin:end]) if source.num_classes else None
            val = torch.from_numpy(is_val[begin:end])
            for name, writer in writers.items():
                mask = val if name == "val" else ~val
                if bool(mask.any()):
                    writer.add(codes[mask], None if labels is None else labels[mask])
                    usage[name].add(codebook, latents[mask], codes[mask])
        for writer in writers.values():
            writer.close()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    codebook.save_pretrained(work / "codebook", config={"autoencoder": spec})
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source": source.record(),
        "autoencoder": spec,
        "latent_grid": [h, w],
        "codebook": {"num_codes": codebook.num_codes, "dim": codebook.dim, "fitted": codebook.fit_info is not None,
                     "seed": codebook.seed},
        "split": split,
        "num_images": total,
        "skipped": skipped,
        "usage": {name: u.summary() for name, u in usage.items() if u.vectors},
    }
    # Into place: the old encoding's marker goes first, the new one comes last.
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / ENCODING_NAME).unlink(missing_ok=True)
    moves = ["codebook", "train", INDICES_NAME] + (["val"] if num_val else [])
    for name in ("codebook", "train", "val", "latents"):
        shutil.rmtree(out_dir / name, ignore_errors=True)
    (out_dir / INDICES_NAME).unlink(missing_ok=True)
    for name in moves:
        os.replace(work / name, out_dir / name)
    if keep_latents:
        (out_dir / "latents").mkdir()
        for file in work.glob("*.npy"):
            os.replace(file, out_dir / "latents" / file.name)
    tmp = out_dir / f".{ENCODING_NAME}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, out_dir / ENCODING_NAME)
    return EncodeResult(out_dir, codebook, out_dir / "train", out_dir / "val" if num_val else None, record)


class _Usage:
    """Code usage and reconstruction error accumulated over chunks (readable diagnostics, not counts)."""

    def __init__(self, num_codes: int) -> None:
        self.counts = torch.zeros(num_codes, dtype=torch.long)
        self.sq_error, self.vectors, self.dim = 0.0, 0, 1

    def add(self, codebook: Codebook, latents: torch.Tensor, codes: torch.Tensor) -> None:
        self.counts += torch.bincount(codes.reshape(-1), minlength=len(self.counts))
        self.sq_error += float((codebook.decode(codes) - latents).pow(2).sum())
        self.vectors += codes.numel()
        self.dim = latents.shape[-1]

    def summary(self) -> dict[str, Any]:
        p = self.counts.double() / max(self.vectors, 1)
        entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
        return {"latent_mse": self.sq_error / max(self.vectors * self.dim, 1), "perplexity": math.exp(entropy),
                "dead_codes": int((self.counts == 0).sum()), "top_code_share": float(p.max()),
                "num_vectors": self.vectors}


def _describe(autoencoder: Autoencoder, source: ImageSource) -> str:
    spec = autoencoder.spec()
    origin = spec.get("source") or spec.get("name") or spec["kind"]
    return (f"latents {autoencoder.latent_grid[0]}x{autoencoder.latent_grid[1]}x{autoencoder.latent_dim} of "
            f"{spec.get('class', spec['kind'])} {origin} at {autoencoder.image_size[0]}x{autoencoder.image_size[1]}")


# ---------------------------------------------------------------------- back to pixels


def load_encoding(out_dir: str | os.PathLike[str], *, autoencoder: Autoencoder | None = None,
                  **load_kwargs: Any) -> tuple[dict[str, Any], Codebook, Autoencoder]:
    """The record, codebook and autoencoder of an `encode_images` folder. The autoencoder is rebuilt
    from the record unless given, and a given one must be the recorded one (`check_autoencoder`)."""
    out_dir = Path(out_dir)
    path = out_dir / ENCODING_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{out_dir} holds no {ENCODING_NAME}: not a complete encoding")
    record = json.loads(path.read_text())
    codebook = Codebook.from_pretrained(out_dir / "codebook")
    if autoencoder is None:
        autoencoder = load_autoencoder(record["autoencoder"], **load_kwargs)
    else:
        check_autoencoder(record["autoencoder"], autoencoder, what=f"the codes in {out_dir}")
    return record, codebook, autoencoder


def source_from_record(record: dict[str, Any]) -> ImageSource:
    """The source an encoding read (its `encoding.json["source"]`), opened again: an image folder, or a
    `datasets` data set given by name or folder. Arrays and in-memory data sets cannot be; ValueError."""
    if record.get("type") == "FolderSource":
        return FolderSource(record["root"])
    if record.get("type") == "DatasetSource" and record.get("data"):
        return DatasetSource(record["data"], split=record.get("split", "train"), image_column=record["image_column"],
                             label_column=record["label_column"], revision=record.get("revision"),
                             **record.get("load_kwargs", {}))
    raise ValueError(f"the source {record.get('description') or record.get('type')!r} cannot be read again "
                     "(arrays or an in-memory data set); give the real images another way (e.g. --real DIR)")


def load_source_indices(out_dir: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The source item of every code grid of an encoding: {"train": (n_train,), "val": (n_val,)}, in
    dataset order (e.g. to read the real held-out images for FID with `iter_image_batches`)."""
    return load_file(str(Path(out_dir) / INDICES_NAME))


def check_prior(config: Any, codebook: Codebook, autoencoder: Autoencoder) -> None:
    """Refuse a prior (a GPTConfig) whose seq_len or vocabulary does not fit codebook + autoencoder."""
    h, w = autoencoder.latent_grid
    if codebook.dim != autoencoder.latent_dim:
        raise ValueError(f"codebook dim {codebook.dim} does not match the autoencoder's latent_dim "
                         f"{autoencoder.latent_dim}")
    if config.seq_len != h * w:
        raise ValueError(f"the prior's seq_len {config.seq_len} does not match the autoencoder's latent grid "
                         f"{h}x{w} = {h * w} codes per image")
    size = getattr(config, "codebook_size", None)
    if size is not None and size != codebook.num_codes:
        raise ValueError(f"the prior's codebook_size {size} does not match the codebook's num_codes "
                         f"{codebook.num_codes}")


def decode_codes(codes: torch.Tensor, codebook: Codebook, autoencoder: Autoencoder,
                 batch_size: int | None = None) -> torch.Tensor:
    """Codes (N, h, w) or (N, h*w) -> images (N, C, H, W) in [0, 1] through codebook and autoencoder,
    batch by batch."""
    h, w = autoencoder.latent_grid
    if codebook.dim != autoencoder.latent_dim:
        raise ValueError(f"codebook dim {codebook.dim} does not match the autoencoder's latent_dim "
                         f"{autoencoder.latent_dim}")
    if not isinstance(codes, torch.Tensor):
        codes = torch.as_tensor(np.asarray(codes))
    if codes.ndim == 2 and codes.shape[1] == h * w:
        codes = codes.reshape(-1, h, w)
    if codes.ndim != 3 or tuple(codes.shape[1:]) != (h, w):
        raise ValueError(f"codes must have shape (N, {h}, {w}) or (N, {h * w}) for the autoencoder's latent grid, "
                         f"got {tuple(codes.shape)}")
    batch_size = batch_size or autoencoder.batch_size
    out = torch.empty(codes.shape[0], autoencoder.channels, *autoencoder.image_size)
    for begin in range(0, codes.shape[0], batch_size):
        chunk = codes[begin:begin + batch_size]
        out[begin:begin + len(chunk)] = autoencoder.decode(codebook.decode(chunk))
    return out


def image_decoder(codebook: Codebook, autoencoder: Autoencoder) -> Any:
    """A `codegpt.runs.Decoder` for sample grids: codes (B, h, w) -> images (B, H, W) for one channel,
    (B, H, W, 3) for colour (an alpha channel is dropped), values in [0, 1]."""
    if codebook.dim != autoencoder.latent_dim:
        raise ValueError(f"codebook dim {codebook.dim} does not match the autoencoder's latent_dim "
                         f"{autoencoder.latent_dim}")

    def decode(codes: torch.Tensor) -> torch.Tensor:
        images = decode_codes(codes, codebook, autoencoder)
        return images[:, 0] if images.shape[1] == 1 else images[:, :3].permute(0, 2, 3, 1)

    return decode
