"""A training run's folder: its layout, its checkpoints, its metrics, and loading its model.

The one place that knows where things are in a run; training writes it, and the CLI, evaluation
and the Hub push read it through these functions::

    run/
      training_args.json          the arguments, for the record
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ._util import check_path, read_json, resolve_device, write_text
from .configuration_codegpt import GPTConfig
from .modeling_codegpt import GPT

__all__ = [
    "MODEL_DIR",
    "CHECKPOINTS_DIR",
    "TRAINING_ARGS",
    "LOG",
    "STATE",
    "SAMPLES",
    "checkpoint_name",
    "complete_checkpoints",
    "newest_checkpoint",
    "remove_partial_checkpoints",
    "RunFiles",
    "resolve_run",
    "load_model",
    "read_metrics",
    "write_log",
    "append_log",
]

MODEL_DIR = "model"
CHECKPOINTS_DIR = "checkpoints"
TRAINING_ARGS = "training_args.json"
LOG = "log.jsonl"
STATE = "trainer_state.json"  # written last: its presence marks a complete checkpoint
SAMPLES = "samples.png"
CHECKPOINT_RE = re.compile(r"^step-(\d{6,})$")


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint at ``step``: ``step-000500``."""
    return f"step-{step:06d}"


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def complete_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """The run's complete checkpoints as (step, folder), oldest first.

    Complete: a ``step-N`` folder whose ``trainer_state.json`` parses and says step N, and whose
    ``model/config.json`` exists.
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    found = []
    if not root.is_dir():
        return found
    for entry in root.iterdir():
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


# ---------------------------------------------------------------------------------------------
# Finding and loading a model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunFiles:
    """A model folder and what its run says about it (see ``resolve_run``)."""

    model_dir: Path
    metrics: dict[str, Any] | None  # the evaluation of these weights, if the run made one
    training_args: dict[str, Any] | None


def resolve_run(path: str | os.PathLike, what: str = "model_dir") -> RunFiles:
    """The model folder, its evaluation and the training arguments of a run (or of a model folder).

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
        metrics = _checkpoint_metrics(parent, what)
        run = parent.parent.parent
    elif model_dir.name == MODEL_DIR and (parent / TRAINING_ARGS).is_file():
        run = parent
        metrics = read_metrics(run, what)
    training_args = None
    if run is not None and (run / TRAINING_ARGS).is_file():
        training_args = read_json(run / TRAINING_ARGS, what)
    return RunFiles(model_dir=model_dir, metrics=metrics, training_args=training_args)


def _checkpoint_metrics(checkpoint: Path, what: str) -> dict[str, Any] | None:
    state = read_json(checkpoint / STATE, what)
    history = [e for e in state.get("eval_history") or [] if isinstance(e, dict)]
    at_step = [e for e in history if e.get("step") == state.get("step")]
    return at_step[-1] if at_step else None


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
    target = resolve_device(device)
    model = GPT.from_pretrained(model_dir, dtype="auto" if dtype is None else dtype)
    return model.to(target).eval()


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


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
