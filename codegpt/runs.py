"""A training run's folder: its layout, its checkpoints, its metrics, loading its model, its samples.

The one place that knows where things are in a run: training writes it; the CLI, evaluation and the
Hub push read it. The per-class sampler and image grid of ``samples.png`` live here too::

    run/
      training_args.json          the arguments, for the record
      data.json                   what the codes decode through: data, codebook and autoencoder (spec), split
      log.jsonl                   one line per evaluation (step, held-out nats and bits per code)
      checkpoints/step-000500/    model/ (save_pretrained) + Accelerate state + trainer_state.json
      model/                      the final model (save_pretrained; loads with GPT.from_pretrained)
      samples.png                 a grid of samples at the end (one row per class)

A checkpoint is written to ``step-XXXXXX.tmp`` and renamed into place, ``trainer_state.json``
last, so a folder without it (a kill mid-save) is never taken for a checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError

from ._util import atomic_write, check_int, check_path, read_json, resolve_device, write_text
from .configuration_codegpt import GPTConfig
from .modeling_codegpt import GPT
from .sampling import generate

__all__ = [
    "MODEL_DIR", "CHECKPOINTS_DIR", "TRAINING_ARGS", "RUN_DATA", "LOG", "STATE", "SAMPLES", "checkpoint_name",
    "complete_checkpoints", "newest_checkpoint", "remove_partial_checkpoints", "RunFiles", "resolve_run",
    "load_model", "read_metrics", "write_log", "append_log", "Decoder", "sample_classes", "render_codes",
    "save_image_grid",
]

MODEL_DIR = "model"
CHECKPOINTS_DIR = "checkpoints"
TRAINING_ARGS = "training_args.json"
RUN_DATA = "data.json"  # {"data", "codebook" (absolute folders), "autoencoder" (a spec), "split"}
LOG = "log.jsonl"
STATE = "trainer_state.json"  # written last: its presence marks a complete checkpoint
SAMPLES = "samples.png"
CHECKPOINT_RE = re.compile(r"^step-(\d{6,})$")


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint at ``step``: ``step-000500``."""
    return f"step-{step:06d}"


def complete_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """The run's complete checkpoints as (step, folder), oldest first.

    Complete: a ``step-N`` folder whose ``trainer_state.json`` parses and says step N, and whose
    ``model/config.json`` exists.
    """
    root, found = Path(run_dir) / CHECKPOINTS_DIR, []
    for entry in root.iterdir() if root.is_dir() else []:
        m = CHECKPOINT_RE.match(entry.name)
        if not m or not entry.is_dir() or not (entry / MODEL_DIR / "config.json").is_file():
            continue
        try:
            state = json.loads((entry / STATE).read_text())
        except (OSError, ValueError):
            continue  # half-written: the state is written last
        if isinstance(state, dict) and state.get("step") == int(m.group(1)):
            found.append((int(m.group(1)), entry))
    return sorted(found)


def newest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run folder, or None."""
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def remove_partial_checkpoints(run_dir: str | os.PathLike) -> None:
    """Delete ``step-N.tmp`` folders: saves cut short by a kill."""
    for partial in (Path(run_dir) / CHECKPOINTS_DIR).glob("step-*.tmp"):
        shutil.rmtree(partial, ignore_errors=True)


@dataclass(frozen=True)
class RunFiles:
    """A model folder and what its run says about it (see ``resolve_run``)."""

    model_dir: Path
    metrics: dict[str, Any] | None  # the evaluation of these weights, if the run made one
    training_args: dict[str, Any] | None
    data: dict[str, Any] | None = None  # the run's RUN_DATA: what its codes decode through


def resolve_run(path: str | os.PathLike, what: str = "model_dir") -> RunFiles:
    """The model folder, its evaluation, training arguments and data record of a run (or of a model folder).

    ``path`` is a run folder of ``codegpt train`` (its final ``model/``, else its newest complete
    checkpoint), a checkpoint ``checkpoints/step-N``, or any ``save_pretrained`` folder. Metrics are
    those of these weights: a checkpoint's last evaluation at its own step, the final model's last
    line of ``log.jsonl``. A bare model folder outside a run gives neither metrics nor arguments.
    Errors name ``what``, the argument the path came from.
    """
    path = check_path(what, path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: no such directory {str(path)!r}")
    if (path / "config.json").is_file():
        model_dir = path
    elif (path / MODEL_DIR / "config.json").is_file():
        model_dir = path / MODEL_DIR
    elif (checkpoint := newest_checkpoint(path)) is not None:
        model_dir = checkpoint / MODEL_DIR
    else:
        raise FileNotFoundError(
            f"{what}: {str(path)!r} holds no model: expected config.json (a save_pretrained folder), "
            "model/ (a finished run) or checkpoints/step-N/model (a run's checkpoint)"
        )

    metrics, run = None, None
    parent = model_dir.parent
    if CHECKPOINT_RE.match(parent.name) and (parent / STATE).is_file():
        state = read_json(parent / STATE, what)
        history = state.get("eval_history") or []
        at_step = [e for e in history if isinstance(e, dict) and e.get("step") == state.get("step")]
        metrics, run = (at_step[-1] if at_step else None), parent.parent.parent
    elif model_dir.name == MODEL_DIR and (parent / TRAINING_ARGS).is_file():
        run = parent
        metrics = read_metrics(run, what)
    has_args = run is not None and (run / TRAINING_ARGS).is_file()
    has_data = run is not None and (run / RUN_DATA).is_file()
    return RunFiles(model_dir, metrics, read_json(run / TRAINING_ARGS, what) if has_args else None,
                    read_json(run / RUN_DATA, what) if has_data else None)


def load_model(
    path: str | os.PathLike,
    device: str | torch.device | None = "auto",
    dtype: torch.dtype | str | None = None,
    what: str = "model_dir",
) -> GPT:
    """The model of ``path`` (anything ``resolve_run`` accepts) on ``device``, in eval mode.

    ``dtype=None`` keeps the precision the weights were saved in (transformers' ``dtype="auto"``;
    a training run saves fp32); pass a dtype to cast. ``device="auto"`` is the accelerator when
    there is one, else the CPU.
    """
    model_dir = resolve_run(path, what).model_dir
    model_type = read_json(model_dir / "config.json", what).get("model_type")
    if model_type != GPTConfig.model_type:
        raise ValueError(f"{what}: {str(model_dir)!r} holds a {model_type!r} model, not a {GPTConfig.model_type!r} one")
    target = resolve_device(device)  # before the load: a bad device fails fast
    try:
        model = GPT.from_pretrained(model_dir, dtype="auto" if dtype is None else dtype)
    except SafetensorError as err:  # a truncated or foreign weights file
        weights = str(model_dir / "model.safetensors")
        raise ValueError(f"{what}: {weights!r} is not a readable safetensors file ({err})") from None
    except OSError as err:  # transformers found no weights file
        raise FileNotFoundError(f"{what}: {err}") from None
    return model.to(target).eval()


def read_metrics(run_dir: str | os.PathLike, what: str = "run_dir") -> dict[str, Any] | None:
    """The run's last evaluation (the last line of ``log.jsonl``), or None when it has none."""
    log = Path(run_dir) / LOG
    if not log.is_file() or not log.read_text().strip():
        return None
    return read_json(log, what)


def write_log(run_dir: str | os.PathLike, records: list[dict[str, Any]]) -> None:
    """Replace the run's log with ``records``, atomically."""
    write_text(Path(run_dir) / LOG, "".join(json.dumps(r) + "\n" for r in records))


def append_log(run_dir: str | os.PathLike, record: dict[str, Any]) -> None:
    """Add one evaluation to the run's log. An append of one short line: a kill leaves at worst a
    truncated last line, and the next run rewrites the log from its checkpoint (``write_log``)."""
    with open(Path(run_dir) / LOG, "a") as f:
        f.write(json.dumps(record) + "\n")


# Images (B, h, w) or (B, h, w, 3) with values in [0, 1], from codes (B, H, W).
Decoder = Callable[[torch.Tensor], "np.ndarray | torch.Tensor"]


@torch.no_grad()
def sample_classes(
    model: GPT,
    num_per_class: int,
    classes: Sequence[int] | None = None,
    *,
    guidance_scale: float | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    batch_size: int = 1000,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``num_per_class`` samples of each class in ``classes`` (default every class), grouped by class.

    Returns codes (len(classes) * num_per_class, seq_len) on the CPU and their classes (same
    length), or, for an unconditional model, ``num_per_class`` samples and None. Seeded through a
    generator of its own, so torch's global RNG (dropout in a training run) is untouched; the model
    is sampled in eval mode and left in the mode it was in.
    """
    config = model.config
    check_int("num_per_class", num_per_class, low=1)
    check_int("batch_size", batch_size, low=1)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    if config.class_conditional:
        wanted = list(range(config.num_classes)) if classes is None else [check_int("classes", c) for c in classes]
        if not wanted or not all(0 <= c < config.num_classes for c in wanted):
            raise ValueError(f"classes must be class ids in [0, {config.num_classes}), got {classes!r}")
        labels = torch.tensor(wanted, device=device).repeat_interleave(num_per_class)
    elif classes is not None:
        raise ValueError("classes were given but the model is unconditional (config.class_conditional=False)")
    chunks = []  # generate() samples in eval mode and leaves the model's mode alone
    total = len(labels) if config.class_conditional else num_per_class
    for begin in range(0, total, batch_size):
        end = min(begin + batch_size, total)
        tokens = generate(model, classes=labels[begin:end] if config.class_conditional else None,
                          num_samples=None if config.class_conditional else end - begin, guidance_scale=guidance_scale,
                          temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        chunks.append(tokens[:, 1:])  # drop the start token
    return torch.cat(chunks).cpu(), labels.cpu() if config.class_conditional else None


def render_codes(
    codes: torch.Tensor, grid_shape: tuple[int, int], decode: Decoder | None, num_codes: int
) -> np.ndarray:
    """Images in [0, 1] for codes (B, seq_len): decoded pixels, or one fixed colour per code."""
    codes = codes.reshape(codes.shape[0], *grid_shape).cpu()
    if decode is not None:
        images = decode(codes)
        return images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    palette = np.random.default_rng(0).uniform(0.15, 1.0, size=(num_codes, 3))
    return palette[codes.numpy()]


def save_image_grid(
    images: np.ndarray | torch.Tensor, path: str | os.PathLike, rows: int, scale: int = 8, pad: int = 2
) -> Path:
    """Tile images (N, h, w) or (N, h, w, 3) with values in [0, 1] into ``rows`` rows and write a PNG
    atomically. Each pixel is upscaled ``scale`` times so that small images stay viewable; a grey
    gutter of ``pad`` pixels separates them (grey: neither the ink nor the paper of any image)."""
    from PIL import Image

    images = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if images.ndim == 3:
        images = np.repeat(images[..., None], 3, axis=-1)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must have shape (N, h, w) or (N, h, w, 3), got {images.shape}")
    n, h, w, _ = images.shape
    if rows < 1 or n % rows:
        raise ValueError(f"rows must be >= 1 and divide the number of images {n}, got {rows}")
    images = np.clip(images, 0.0, 1.0).repeat(scale, axis=1).repeat(scale, axis=2)
    # A gutter above and left of each image, tiles laid out row-major, then the bottom and right gutters.
    tiles = np.pad(images, ((0, 0), (pad, 0), (pad, 0), (0, 0)), constant_values=0.5)
    tiles = tiles.reshape(rows, n // rows, *tiles.shape[1:]).transpose(0, 2, 1, 3, 4)
    canvas = np.pad(tiles.reshape(rows * tiles.shape[1], -1, 3), ((0, pad), (0, pad), (0, 0)), constant_values=0.5)
    picture = Image.fromarray((canvas * 255).round().astype(np.uint8))
    return atomic_write(path, lambda f: picture.save(f, format="PNG"))
