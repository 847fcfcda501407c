"""Share a trained prior on the Hugging Face Hub: the model card, the upload folder, the push.

Read top to bottom:

1. what goes on a card (``CardInfo``) and into ``generation_config.json`` (``SamplingSettings``);
2. ``render_model_card``: the top-level ``model_card.md`` template plus a model's config, its metrics
   and its training settings, checked by huggingface_hub's own ``ModelCard`` parser;
3. ``prepare_upload_folder``: exactly the folder that gets uploaded, written atomically. It holds the
   weights (safetensors), ``config.json`` with ``auto_map``, the two remote-code files,
   ``generation_config.json``, ``README.md``, and the codebook in ``codebook/`` when there is one;
4. ``push_to_hub``: that folder, uploaded; then the card pinned to the commit it made;
5. ``load_codebook``: the codebook of a repo id or folder, so that ``codes -> latents`` is one call;
6. ``add_push_parser``: the ``codegpt push`` command.

Tokens: this module never takes a token from the command line and never writes or logs one. The
library functions accept ``token=`` and otherwise leave it to huggingface_hub (``HF_TOKEN``, or the
login stored by ``hf auth login``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import transformers

from .configuration_codegpt import GPTConfig
from .modeling_codegpt import GPT

__all__ = [
    "CODEBOOK_DIR",
    "CardInfo",
    "EvalMetric",
    "RunFiles",
    "SamplingSettings",
    "TESTED_TRANSFORMERS",
    "add_push_parser",
    "dataset_card_info",
    "load_codebook",
    "prepare_upload_folder",
    "push_to_hub",
    "read_json",
    "render_model_card",
    "resolve_run",
    "run_push",
    "select_metrics",
    "upload_file_names",
]

# The oldest and newest transformers releases the remote-code files are tested against (.ci/compat.sh
# runs the model and remote-code tests on the first, the main CI on the second).
TESTED_TRANSFORMERS = ("4.57.6", "5.24.0")
MIN_TORCH = "2.4"

CODEBOOK_DIR = "codebook"
README_NAME = "README.md"
_MODEL_FILES = (
    "config.json",
    "configuration_codegpt.py",
    "generation_config.json",
    "model.safetensors",
    "modeling_codegpt.py",
)
_CODEBOOK_FILES = ("config.json", "model.safetensors")

# Files a previous push may have left that would shadow or contradict the new ones (stale shards
# with their index, pickled weights, old model code); other files a user added to the repo are kept.
_STALE_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "configuration_*.py",
    "modeling_*.py",
    f"{CODEBOOK_DIR}/*",
]

PIPELINE_TAG = "unconditional-image-generation"
_BASE_TAGS = ("codegpt", "image-generation", "image-tokens", "vq", "custom_code")

# Training-argument keys whose values must never reach a public card.
_SECRET_KEY = re.compile(r"token|secret|password|passwd|api[_-]?key|credential|auth", re.IGNORECASE)
_LICENSE = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")
# A revision is pasted into Python code on the card: a branch, tag or commit name, never a quote.
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")

_METRIC_NAMES = {
    "bits_per_code": "Bits per code",
    "bpc": "Bits per code",
    "loss": "Cross-entropy (nats per code)",
    "loss_nats": "Cross-entropy (nats per code)",
    "nll": "Cross-entropy (nats per code)",
    "perplexity": "Perplexity",
    "accuracy": "Next-code accuracy",
    "fid": "FID",
    "inception_score": "Inception score",
    "precision": "Precision",
    "recall": "Recall",
    # The figures of codegpt.evaluation.evaluate_prior (and so of `codegpt demo`'s metrics.json).
    "baseline_bits_per_code": "Bits per code of an independent per-position baseline",
    "bits_ratio": "Bits per code / baseline's",
    "class_consistency_guided": "Class consistency, guided samples (judged)",
    "class_consistency_unguided": "Class consistency, unguided samples (judged)",
    "novelty_guided": "Novelty, guided samples (not a training image)",
    "novelty_unguided": "Novelty, unguided samples (not a training image)",
    "distinct_guided": "Distinct guided samples",
    "distinct_unguided": "Distinct unguided samples",
    "judge_accuracy": "Judge accuracy, held-out images through the codebook",
    "judge_accuracy_real": "Judge accuracy, real held-out images",
    "codebook_mse": "Codebook reconstruction MSE, held out",
    "codebook_mse_train": "Codebook reconstruction MSE, training split",
}
# Metrics measured on samples, whose value depends on the sampling settings: a card must state them.
_SAMPLE_BASED = re.compile(r"fid|inception|precision|recall|novelty|consistency|distinct|diversity")
# Numbers a training log holds next to its metrics that say nothing about the model's quality.
_BOOKKEEPING = re.compile(
    r"(^|_)(step|steps|epoch|epochs|runtime|seconds|time|samples_per_second|steps_per_second|"
    r"tokens_per_second|lr|learning_rate|grad_norm|num_tokens|num_codes|num_samples|world_size|seed)$"
)
_SPLIT_PREFIXES = {"eval_": "validation", "val_": "validation", "valid_": "validation", "test_": "test"}
# Training arguments about where and how a run was launched, not about the model: a card leaves
# them out (output_dir would also publish a local path).
_OPERATIONAL_ARGS = frozenset(
    {"output_dir", "overwrite_output_dir", "resume", "progress", "num_workers", "log_every", "logging_dir"}
)

# The run folder of codegpt.training: training_args.json, log.jsonl (one evaluation per line),
# model/ (the final model) and checkpoints/step-N/{model/, trainer_state.json}.
TRAINING_ARGS_NAME = "training_args.json"
EVAL_LOG_NAME = "log.jsonl"


# ---------------------------------------------------------------------------------------------
# What goes on a card and into generation_config.json
# ---------------------------------------------------------------------------------------------


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class SamplingSettings:
    """The recommended sampling settings, saved in ``generation_config.json`` and stated on the card.

    ``temperature=0`` is greedy; ``top_k`` ``None``/``0`` and ``top_p`` ``None``/``1`` are off;
    ``guidance_scale`` ``None``/``1`` is off and needs a class-conditional model otherwise.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    guidance_scale: float | None = None

    def check(self, config: GPTConfig) -> None:
        """Raise ``ValueError`` naming the first setting out of range for ``config``."""
        if not _is_number(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature!r}")
        if self.top_k is not None and (
            isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0
        ):
            raise ValueError(f"top_k must be None or an int >= 0 (0 or None is off), got {self.top_k!r}")
        if self.top_p is not None and (not _is_number(self.top_p) or not 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be None or a number in (0, 1] (1 or None is off), got {self.top_p!r}")
        if self.guidance_scale is not None:
            if not _is_number(self.guidance_scale) or self.guidance_scale < 0:
                raise ValueError(
                    f"guidance_scale must be None or a finite number >= 0 (None or 1 is off), "
                    f"got {self.guidance_scale!r}"
                )
            if self.guided and not config.class_conditional:
                raise ValueError(
                    f"guidance_scale={self.guidance_scale} needs a class-conditional model "
                    "(config.class_conditional=False); leave it unset"
                )

    @property
    def guided(self) -> bool:
        return self.guidance_scale is not None and self.guidance_scale != 1

    def generation_kwargs(self) -> dict[str, Any]:
        """The ``GenerationConfig`` fields these settings set."""
        if self.temperature == 0:
            # Greedy: sampling knobs would make GenerationConfig's validation refuse to save.
            kwargs: dict[str, Any] = {"do_sample": False}
        else:
            # top_k stated even when off: generate() adds top_k=50 on its own when it is unset.
            kwargs = {
                "do_sample": True,
                "temperature": float(self.temperature),
                "top_k": int(self.top_k or 0),
            }
            if self.top_p is not None and self.top_p < 1:
                kwargs["top_p"] = float(self.top_p)
        if self.guided:
            kwargs["guidance_scale"] = float(self.guidance_scale)
        return kwargs

    def summary(self, class_conditional: bool = True) -> str:
        """One line for the card, e.g. ``temperature 1, top-k off, top-p off, guidance off``."""
        if self.temperature == 0:
            parts = ["greedy (do_sample=False)"]
        else:
            parts = [
                f"temperature {float(self.temperature):g}",
                f"top-k {self.top_k}" if self.top_k else "top-k off",
                f"top-p {float(self.top_p):g}" if self.top_p is not None and self.top_p < 1 else "top-p off",
            ]
        if class_conditional:
            parts.append(f"guidance scale {float(self.guidance_scale):g}" if self.guided else "guidance off")
        return ", ".join(parts)


@dataclass(frozen=True)
class CardInfo:
    """What a card says that the model's config cannot.

    Args:
        license: an SPDX-style license id as the Hub spells it (``apache-2.0``, ``mit``, ``other``).
        model_name: the card's title and the ``model-index`` name; defaults to the repo name.
        description: a paragraph under the title.
        dataset_id: the training data's id (a Hub dataset id, or a short name such as
            ``sklearn-digits``); needed for evaluation results (it is their ``dataset.type``).
        dataset_name: the training data's human name (defaults to ``dataset_id``).
        dataset_split: the split the metrics were measured on.
        class_names: one name per class of a class-conditional model, in class-id order.
        grid_shape: ``(H, W)`` with ``H * W == seq_len``; a square ``seq_len`` gives it by default.
        decoder: a sentence saying what turns codes (or the codebook's latents) into pixels. Needed
            when no codebook is shipped: a card must say how its codes become an image.
        base_model: the Hub repo of the VQ tokenizer / autoencoder the codes come from, if any.
        tags: extra Hub tags.
    """

    license: str = "apache-2.0"
    model_name: str | None = None
    description: str | None = None
    dataset_id: str | None = None
    dataset_name: str | None = None
    dataset_split: str = "validation"
    class_names: Sequence[str] | None = None
    grid_shape: tuple[int, int] | None = None
    decoder: str | None = None
    base_model: str | None = None
    tags: Sequence[str] = field(default_factory=tuple)


@dataclass(frozen=True)
class EvalMetric:
    """One evaluation result: ``key`` is its machine name (``bits_per_code``), ``split`` its data."""

    key: str
    value: float
    split: str

    @property
    def name(self) -> str:
        return _METRIC_NAMES.get(self.key, self.key.replace("_", " ").capitalize())


def select_metrics(metrics: Mapping[str, Any], default_split: str = "validation") -> list[EvalMetric]:
    """The quality metrics in a run's metrics record, in a stable order.

    ``metrics`` is a flat mapping (``{"eval_bits_per_code": 2.1, "step": 500, ...}``), or holds one
    under ``"final"``/``"eval"``/``"metrics"``, or a ``"history"`` list whose last entry with metrics
    counts. Prefixes ``eval_``/``val_``/``test_`` name the split; step counts, timings and learning
    rates are left out.
    """
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a mapping of metric name to number, got {type(metrics).__name__}")
    record: Mapping[str, Any] = metrics
    for key in ("final", "eval", "metrics"):
        if isinstance(metrics.get(key), Mapping):
            record = metrics[key]
            break
    else:
        history = metrics.get("history")
        if isinstance(history, list):
            rows = [row for row in history if isinstance(row, Mapping) and _quality_items(row, default_split)]
            record = rows[-1] if rows else {}
    return _quality_items(record, default_split)


def _quality_items(record: Mapping[str, Any], default_split: str) -> list[EvalMetric]:
    out = []
    for raw_key, value in record.items():
        if not isinstance(raw_key, str) or _BOOKKEEPING.search(raw_key) or raw_key.startswith("train_"):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # nested records, strings and flags are not metrics
        if not math.isfinite(value):
            raise ValueError(f"metrics[{raw_key!r}] must be a finite number, got {value!r}")
        key, split = raw_key, default_split
        for prefix, name in _SPLIT_PREFIXES.items():
            if raw_key.startswith(prefix):
                key, split = raw_key[len(prefix) :], name
                break
        out.append(EvalMetric(key=key, value=float(value), split=split))
    return sorted(out, key=lambda m: (m.split, m.key))


def _eval_sampling_from(metrics: Mapping[str, Any] | None) -> str | None:
    """The sampling behind sample-based figures, from a ``settings`` record next to them (as in
    ``codegpt demo``'s metrics.json: evaluate_prior samples at temperature 1 without top-k)."""
    settings = metrics.get("settings") if isinstance(metrics, Mapping) else None
    if not isinstance(settings, Mapping) or "samples_per_class" not in settings:
        return None
    temperature = settings.get("temperature", 1.0)
    guidance = settings.get("guidance_scale")
    text = f"temperature {temperature:g}, top-k off, {settings['samples_per_class']} samples per class"
    if guidance is not None:
        text += f"; guided figures at guidance scale {guidance:g}, unguided ones without guidance"
    return text


def read_json(path: str | os.PathLike[str], name: str) -> dict[str, Any]:
    """Read a JSON object, or the last record of a JSON-lines file (``.jsonl``, e.g. a run's
    ``log.jsonl``), with errors naming the argument ``name`` it came from."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{name}: no such file {str(path)!r}")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            lines = [line for line in text.splitlines() if line.strip()]
            if not lines:
                raise ValueError(f"{name}: {str(path)!r} holds no record")
            text = lines[-1]
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{name}: {str(path)!r} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{name}: {str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data


@dataclass(frozen=True)
class RunFiles:
    """Where a training run keeps what a push needs (see ``resolve_run``)."""

    model_dir: Path
    metrics: dict[str, Any] | None
    training_args: dict[str, Any] | None


def resolve_run(path: str | os.PathLike[str]) -> RunFiles:
    """The model folder, its evaluation and the training arguments of a run (or of a model folder).

    ``path`` is a run folder of ``codegpt train`` (its final ``model/``, else its newest complete
    checkpoint), a checkpoint ``checkpoints/step-N``, or any ``save_pretrained`` folder. Metrics are
    those of the pushed weights: a checkpoint's last evaluation at its own step, the final model's
    last line of ``log.jsonl``. A bare model folder outside a run gives neither metrics nor arguments.
    """
    from .training import CHECKPOINT_RE, STATE_NAME

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"model_dir must be a path, got {type(path).__name__}")
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model_dir: no such directory {str(path)!r}")

    def checkpoint_metrics(checkpoint: Path) -> dict[str, Any] | None:
        state = read_json(checkpoint / STATE_NAME, "model_dir")
        history = [e for e in state.get("eval_history") or [] if isinstance(e, dict)]
        at_step = [e for e in history if e.get("step") == state.get("step")]
        return at_step[-1] if at_step else None

    def newest_checkpoint(run: Path) -> Path | None:
        found = []
        for entry in (run / "checkpoints").glob("step-*"):
            m = CHECKPOINT_RE.match(entry.name)
            if m and (entry / STATE_NAME).is_file() and (entry / "model" / "config.json").is_file():
                found.append((int(m.group(1)), entry))
        return max(found)[1] if found else None

    if (path / "config.json").is_file():
        model_dir = path
    elif (path / "model" / "config.json").is_file():
        model_dir = path / "model"
    elif (checkpoint := newest_checkpoint(path)) is not None:
        model_dir = checkpoint / "model"
    else:
        raise FileNotFoundError(
            f"model_dir: {str(path)!r} holds no model: expected config.json (a save_pretrained folder), "
            "model/ (a finished run) or checkpoints/step-N/model (a run's checkpoint)"
        )

    metrics, run = None, None
    parent = model_dir.parent
    if CHECKPOINT_RE.match(parent.name) and (parent / STATE_NAME).is_file():
        metrics = checkpoint_metrics(parent)
        run = parent.parent.parent
    elif model_dir.name == "model" and (parent / TRAINING_ARGS_NAME).is_file():
        run = parent
        if (parent / EVAL_LOG_NAME).is_file():
            metrics = read_json(parent / EVAL_LOG_NAME, "model_dir")
    training_args = None
    if run is not None and (run / TRAINING_ARGS_NAME).is_file():
        training_args = read_json(run / TRAINING_ARGS_NAME, "model_dir")
    return RunFiles(model_dir=model_dir, metrics=metrics, training_args=training_args)


def dataset_card_info(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """What a code dataset folder (``dataset.json``) tells a card: grid, class names, description."""
    meta = read_json(Path(data_dir) / "dataset.json", "data_dir")
    grid = meta.get("grid")
    return {
        "grid_shape": tuple(grid) if isinstance(grid, list) else None,
        "class_names": meta.get("class_names"),
        "description": meta.get("description") or None,
        "codebook_size": meta.get("codebook_size"),
        "num_classes": meta.get("num_classes"),
    }


# ---------------------------------------------------------------------------------------------
# The card
# ---------------------------------------------------------------------------------------------


def _default_template() -> Path:
    # A wheel carries the template inside the package; a source checkout has it at the top level.
    here = Path(__file__).resolve().parent
    for candidate in (here / "model_card.md", here.parent / "model_card.md"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        "template_path: codegpt's model_card.md template was not found next to the package; "
        "pass template_path (codegpt push --template FILE)"
    )


def _check_repo_id(repo_id: object) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str):
        raise TypeError(f"repo_id must be a str such as 'org/name', got {type(repo_id).__name__}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"repo_id {repo_id!r} is not a valid Hub repo id: {err}") from None
    return repo_id


def _check_text(name: str, value: object, allow_empty: bool = False) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ValueError(f"{name} must not be empty")
    return value


def _cell(text: str) -> str:
    """Text that stays inside one markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def _grid(config: GPTConfig, grid_shape: Sequence[int] | None) -> tuple[int, int] | None:
    if grid_shape is None:
        side = math.isqrt(config.seq_len)
        return (side, side) if side * side == config.seq_len else None
    if (
        not isinstance(grid_shape, Sequence)
        or len(grid_shape) != 2
        or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in grid_shape)
    ):
        raise ValueError(f"grid_shape must be two positive ints (H, W), got {grid_shape!r}")
    H, W = grid_shape
    if H * W != config.seq_len:
        raise ValueError(f"grid_shape {H}x{W} = {H * W} codes, but the model's seq_len is {config.seq_len}")
    return (H, W)


def _training_rows(training_args: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    if training_args is None:
        return []
    if not isinstance(training_args, Mapping):
        raise TypeError(f"training_args must be a mapping of setting to value, got {type(training_args).__name__}")
    rows = []
    for key, value in sorted(training_args.items(), key=lambda kv: str(kv[0])):
        if not isinstance(key, str):
            raise TypeError(f"training_args keys must be str, got {key!r}")
        if key in _OPERATIONAL_ARGS:
            continue
        if _SECRET_KEY.search(key) or (isinstance(value, str) and value.startswith("hf_")):
            continue  # a token pasted into a config must not end up on a public card
        try:
            shown = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        except TypeError:
            raise TypeError(f"training_args[{key!r}] must be JSON-serialisable, got {type(value).__name__}") from None
        rows.append((_cell(key), _cell(shown) or '`""`'))
    return rows


def _format_count(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix} ({n:,})"
    return f"{n:,}"


def render_model_card(
    config: GPTConfig,
    *,
    repo_id: str,
    info: CardInfo | None = None,
    sampling: SamplingSettings | None = None,
    metrics: Mapping[str, Any] | None = None,
    training_args: Mapping[str, Any] | None = None,
    codebook: Any | None = None,
    num_parameters: int | None = None,
    revision: str | None = None,
    eval_sampling: str | None = None,
    template_path: str | os.PathLike[str] | None = None,
) -> Any:
    """Render the model card (a ``huggingface_hub.ModelCard``) of a trained prior.

    Args:
        config: the model's ``GPTConfig``.
        repo_id: ``org/name`` the card's code snippets load from.
        info: license, data, class names, grid and decoder (see ``CardInfo``).
        sampling: the recommended sampling settings (as saved in ``generation_config.json``).
        metrics: a run's metrics record (see ``select_metrics``); its quality metrics go into the
            card's table and its ``model-index``.
        training_args: the run's training settings, shown as a table (secrets left out).
        codebook: the ``codegpt.codebook.Codebook`` shipped in ``codebook/``, if any.
        num_parameters: shown on the card when known.
        revision: the commit the card's snippets pin; ``None`` shows ``main`` with a note to pin one.
        eval_sampling: the sampling settings behind sample-based metrics (FID and the like), if any.
        template_path: a Jinja template instead of codegpt's ``model_card.md``.

    Raises:
        TypeError, ValueError: for a missing or malformed input, naming it.
        FileNotFoundError: for a missing template.
    """
    import jinja2
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    if not isinstance(config, GPTConfig):
        raise TypeError(f"config must be a codegpt GPTConfig, got {type(config).__name__}")
    repo_id = _check_repo_id(repo_id)
    info = CardInfo() if info is None else info
    if not isinstance(info, CardInfo):
        raise TypeError(f"info must be a CardInfo, got {type(info).__name__}")
    sampling = SamplingSettings() if sampling is None else sampling
    if not isinstance(sampling, SamplingSettings):
        raise TypeError(f"sampling must be a SamplingSettings, got {type(sampling).__name__}")
    sampling.check(config)

    if not isinstance(info.license, str) or not _LICENSE.match(info.license):
        raise ValueError(
            f"license must be a Hub license id in lower case such as 'apache-2.0', 'mit' or 'other', "
            f"got {info.license!r}"
        )
    for name in ("model_name", "description", "dataset_id", "dataset_name", "decoder", "base_model"):
        _check_text(name, getattr(info, name))
    _check_text("dataset_split", info.dataset_split)
    if info.base_model is not None:
        _check_repo_id(info.base_model)
    if revision is not None and (not isinstance(revision, str) or not _REVISION.match(revision)):
        raise ValueError(f"revision must be a branch, tag or commit sha such as 'main', got {revision!r}")
    grid = _grid(config, info.grid_shape)

    class_names = None
    if info.class_names is not None:
        if not config.class_conditional:
            raise ValueError("class_names were given for an unconditional model (config.class_conditional=False)")
        names = list(info.class_names)
        if len(names) != config.num_classes or not all(isinstance(n, str) and n.strip() for n in names):
            raise ValueError(f"class_names must be {config.num_classes} non-empty strings (num_classes), got {names!r}")
        # Names that only repeat the ids (the digits' "0".."9") would make a table that says nothing.
        if names != [str(i) for i in range(len(names))]:
            class_names = [_cell(n) for n in names]

    if codebook is not None:
        num_codes = getattr(codebook, "num_codes", None)
        if num_codes != config.codebook_size:
            raise ValueError(
                f"codebook has {num_codes} codes but the model's codebook_size is {config.codebook_size}; "
                "a prior only decodes with the codebook it was trained on"
            )
        decoder = info.decoder or (
            "turn the latents into pixels with the decoder of the autoencoder the codebook was fitted on."
        )
    elif info.decoder is not None:
        decoder = info.decoder
    else:
        raise ValueError(
            "decoder: a card must say what turns the codes into pixels; ship the codebook "
            "(codebook_dir / --codebook) or describe the decoder (CardInfo.decoder / --decoder)"
        )

    results = select_metrics(metrics, info.dataset_split) if metrics is not None else []
    sample_based = [m.key for m in results if _SAMPLE_BASED.search(m.key)]
    if sample_based and eval_sampling is None:
        eval_sampling = _eval_sampling_from(metrics)
    if sample_based and eval_sampling is None:
        raise ValueError(
            f"eval_sampling: the sample-based metrics {sample_based} need the sampling settings they were "
            "measured with (eval_sampling / --eval-sampling, e.g. 'temperature 1, top-k off, guidance 2, "
            "100 samples per class')"
        )
    _check_text("eval_sampling", eval_sampling)
    if metrics is not None and not results:
        raise ValueError(
            f"metrics holds no quality metric (finite numbers such as 'eval_bits_per_code'), "
            f"got keys {sorted(map(str, metrics))}"
        )
    if results and info.dataset_id is None:
        raise ValueError(
            "dataset_id: evaluation results need the id of the data they were measured on "
            "(CardInfo.dataset_id / --dataset-id), e.g. 'sklearn-digits'"
        )

    model_name = info.model_name or repo_id.split("/")[-1]
    dataset_name = info.dataset_name or info.dataset_id
    extra: dict[str, Any] = {
        "codebook_size": config.codebook_size,
        "seq_len": config.seq_len,
        "num_classes": config.num_classes,
    }
    if grid is not None:
        extra["grid"] = list(grid)
    tags = list(dict.fromkeys([*_BASE_TAGS, *(["class-conditional"] if config.class_conditional else []), *info.tags]))
    card_data = ModelCardData(
        license=info.license,
        library_name="transformers",
        pipeline_tag=PIPELINE_TAG,
        tags=tags,
        datasets=[info.dataset_id] if info.dataset_id else None,
        metrics=sorted({m.key for m in results}) or None,
        base_model=info.base_model,
        model_name=model_name if results else None,
        eval_results=[
            EvalResult(
                task_type=PIPELINE_TAG,
                task_name="Class-conditional image generation" if config.class_conditional else "Image generation",
                dataset_type=info.dataset_id,
                dataset_name=dataset_name,
                dataset_split=m.split,
                metric_type=m.key,
                metric_name=m.name,
                metric_value=m.value,
            )
            for m in results
        ]
        or None,
        **extra,
    )

    from . import __version__

    context = {
        "card_data": card_data.to_yaml(),
        "model_name": model_name,
        "description": info.description or "",
        "codegpt_version": __version__,
        "repo_id": repo_id,
        "revision": revision,
        "seq_len": config.seq_len,
        "grid": grid,
        "codebook_size": config.codebook_size,
        "vocab_size": config.vocab_size,
        "start_token_id": config.start_token_id,
        "class_conditional": config.class_conditional,
        "num_classes": config.num_classes,
        "class_names": class_names,
        "example_classes": list(range(min(4, config.num_classes))),
        "num_parameters": _format_count(num_parameters) if num_parameters else "not recorded",
        "num_layers": config.num_layers,
        "num_heads": config.num_heads,
        "embed_dim": config.embed_dim,
        "embd_dropout": config.embd_dropout,
        "resid_dropout": config.resid_dropout,
        "attn_dropout": config.attn_dropout,
        "class_dropout_prob": config.class_dropout_prob,
        "codebook": codebook,
        "decoder": decoder,
        "sampling_summary": sampling.summary(config.class_conditional),
        "metrics": [
            {
                "name": m.name,
                "display": f"{m.value:.4g}",
                "split": m.split,
            }
            for m in results
        ],
        "metrics_note": (
            "Bits per code and cross-entropy are held-out likelihoods: teacher-forced, so no sampling "
            "settings enter them."
            if results
            else ""
        ),
        "eval_sampling_summary": eval_sampling or "none (no sample-based metric is reported)",
        "dataset_name": dataset_name,
        "dataset_id": info.dataset_id,
        "training_args": _training_rows(training_args),
        "transformers_range": f"{TESTED_TRANSFORMERS[0]} and {TESTED_TRANSFORMERS[1]}",
        "min_torch": MIN_TORCH,
    }

    path = Path(template_path) if template_path is not None else _default_template()
    if not path.is_file():
        raise FileNotFoundError(f"template_path: no such file {str(path)!r}")
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    try:
        text = env.from_string(path.read_text(encoding="utf-8")).render(**context)
    except jinja2.TemplateSyntaxError as err:
        raise ValueError(f"template_path: {str(path)!r} line {err.lineno}: {err.message}") from None
    except jinja2.UndefinedError as err:
        raise ValueError(
            f"template_path: {str(path)!r} uses a value the card does not provide: {err.message}"
        ) from None
    text = re.sub(r"\n{3,}", "\n\n", text)  # Jinja blocks leave runs of blank lines behind
    try:
        card = ModelCard(text, ignore_metadata_errors=False)
    except Exception as err:  # yaml.YAMLError and huggingface_hub's ValueErrors alike
        raise ValueError(f"the rendered model card's metadata does not parse: {err}") from None
    if card.data.to_dict().get("library_name") != "transformers":
        raise ValueError(f"template_path: {str(path)!r} must start with a '---' block holding {{{{ card_data }}}}")
    return card


# ---------------------------------------------------------------------------------------------
# The upload folder
# ---------------------------------------------------------------------------------------------


def upload_file_names(with_codebook: bool) -> list[str]:
    """Every file an upload folder holds, as paths relative to it, sorted."""
    names = [README_NAME, *_MODEL_FILES]
    if with_codebook:
        names += [f"{CODEBOOK_DIR}/{name}" for name in _CODEBOOK_FILES]
    return sorted(names)


def _existing_dir(name: str, path: str | os.PathLike[str]) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path, got {type(path).__name__}")
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{name}: no such directory {str(path)!r}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{name}: {str(path)!r} has no config.json (not a save_pretrained folder)")
    return path


def _load_model(model_dir: Path) -> GPT:
    _check_model_type(model_dir)
    # dtype="auto" keeps the checkpoint's precision (transformers 4.x would load it as float32).
    return GPT.from_pretrained(model_dir, dtype="auto")


def _check_model_type(model_dir: Path) -> None:
    model_type = read_json(model_dir / "config.json", "model_dir").get("model_type")
    if model_type != GPTConfig.model_type:
        raise ValueError(
            f"model_dir: {str(model_dir)!r} holds a {model_type!r} model, not a {GPTConfig.model_type!r} one"
        )


def _load_codebook_dir(codebook_dir: str | os.PathLike[str]) -> Any:
    from .codebook import Codebook

    path = _existing_dir("codebook_dir", codebook_dir)
    return Codebook.from_pretrained(path)


@dataclass
class _Prepared:
    """A loaded model and codebook, and the card inputs, checked once and reused for the push."""

    model: GPT
    codebook: Any | None
    card_kwargs: dict[str, Any]

    def card(self, revision: str | None) -> Any:
        return render_model_card(self.model.config, revision=revision, **self.card_kwargs)


def _prepare(
    model_dir: str | os.PathLike[str],
    *,
    repo_id: str,
    info: CardInfo | None,
    sampling: SamplingSettings | None,
    metrics: Mapping[str, Any] | None,
    training_args: Mapping[str, Any] | None,
    codebook_dir: str | os.PathLike[str] | None,
    data_dir: str | os.PathLike[str] | None,
    eval_sampling: str | None,
    template_path: str | os.PathLike[str] | None,
) -> _Prepared:
    run = resolve_run(model_dir)
    model = _load_model(_existing_dir("model_dir", run.model_dir))
    cfg = model.config
    # Explicit inputs win over what the run recorded; an empty mapping means "none".
    metrics = run.metrics if metrics is None else (metrics or None)
    training_args = run.training_args if training_args is None else (training_args or None)
    if sampling is None:
        sampling = _sampling_from_training_args(training_args, cfg)
    info = CardInfo() if info is None else info
    if data_dir is not None:
        info = _with_dataset(info, data_dir, cfg)
    codebook = _load_codebook_dir(codebook_dir) if codebook_dir is not None else None
    prepared = _Prepared(
        model=model,
        codebook=codebook,
        card_kwargs={
            "repo_id": repo_id,
            "info": info,
            "sampling": sampling,
            "metrics": metrics,
            "training_args": training_args,
            "codebook": codebook,
            "num_parameters": model.num_parameters(),
            "eval_sampling": eval_sampling,
            "template_path": template_path,
        },
    )
    prepared.card(revision=None)  # every card input is checked before anything is written
    return prepared


def _sampling_from_training_args(training_args: Mapping[str, Any] | None, config: GPTConfig) -> SamplingSettings:
    """The settings the run drew its sample grids with, else the plain defaults."""
    args = training_args or {}
    temperature = args.get("sample_temperature", 1.0)
    guidance = args.get("sample_guidance_scale") if config.class_conditional else None
    return SamplingSettings(temperature=temperature, guidance_scale=guidance)


def _with_dataset(info: CardInfo, data_dir: str | os.PathLike[str], config: GPTConfig) -> CardInfo:
    """``info`` with the blanks filled from a code dataset, after checking it fits the model."""
    meta = dataset_card_info(data_dir)
    if meta["codebook_size"] != config.codebook_size:
        raise ValueError(
            f"data_dir: the dataset's codebook_size is {meta['codebook_size']} but the model's is "
            f"{config.codebook_size}; this is not the data the model was trained on"
        )
    if meta["num_classes"] != config.num_classes:
        raise ValueError(f"data_dir: the dataset has {meta['num_classes']} classes but the model {config.num_classes}")
    return replace(
        info,
        dataset_name=info.dataset_name or meta["description"],
        grid_shape=info.grid_shape or meta["grid_shape"],
        class_names=info.class_names if info.class_names is not None else meta["class_names"],
    )


def _write_folder(prepared: _Prepared, out_dir: Path, revision: str | None, overwrite: bool) -> Path:
    model, cfg = prepared.model, prepared.model.config
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"out_dir: {str(out_dir)!r} exists and is not empty (pass overwrite=True / --overwrite)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        gen = model.generation_config
        # The model's own generation defaults are restated: a checkpoint saved by an older codegpt
        # may lack them, and they are what keeps generate() from sampling the start token.
        gen.bos_token_id = cfg.start_token_id
        gen.suppress_tokens = list(range(cfg.codebook_size, cfg.vocab_size))
        gen.max_length = cfg.seq_len + 1
        for key in ("do_sample", "temperature", "top_k", "top_p", "guidance_scale"):
            setattr(gen, key, None)  # settings from an earlier push must not linger
        gen.update(**prepared.card_kwargs["sampling"].generation_kwargs())
        gen._from_model_config = False  # hand-set now: generate() must not re-derive it from config.json
        gen.validate()
        model.save_pretrained(tmp)
        if prepared.codebook is not None:
            with tempfile.TemporaryDirectory(dir=tmp) as cb_tmp:
                prepared.codebook.save_pretrained(cb_tmp)
                (tmp / CODEBOOK_DIR).mkdir()
                for name in _CODEBOOK_FILES:
                    os.replace(Path(cb_tmp) / name, tmp / CODEBOOK_DIR / name)
        (tmp / README_NAME).write_text(str(prepared.card(revision)), encoding="utf-8")

        written = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        expected = upload_file_names(prepared.codebook is not None)
        if written != expected:
            # Only the listed files may ever be uploaded (never optimizer state, never a token).
            raise RuntimeError(
                f"the upload folder holds {written}, expected exactly {expected}; "
                f"transformers {transformers.__version__} may save more files than codegpt knows"
            )
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def prepare_upload_folder(
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    repo_id: str,
    info: CardInfo | None = None,
    sampling: SamplingSettings | None = None,
    metrics: Mapping[str, Any] | None = None,
    training_args: Mapping[str, Any] | None = None,
    codebook_dir: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    eval_sampling: str | None = None,
    revision: str | None = None,
    template_path: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write exactly the folder ``push_to_hub`` uploads (``upload_file_names``) to ``out_dir``.

    The model is loaded from ``model_dir`` and saved anew, so nothing else in that folder (optimizer
    or Accelerate state) is carried along, and the code files and ``auto_map`` are those of the
    installed codegpt. The folder is built in a temporary sibling and renamed into place, so
    ``out_dir`` is either complete or absent.

    Args:
        model_dir: a training run folder, one of its checkpoints, or any ``save_pretrained`` folder
            (see ``resolve_run``); a run also gives the metrics and training arguments by default.
        out_dir: where the folder goes; it must not exist or be empty unless ``overwrite``.
        repo_id, info, eval_sampling, template_path: see ``render_model_card``.
        metrics, training_args: override what the run recorded; ``{}`` leaves them off the card.
        sampling: the recommended settings written to ``generation_config.json``; by default the
            temperature and guidance the run drew its sample grids with.
        codebook_dir: a saved ``Codebook`` to ship in ``codebook/``.
        data_dir: the code dataset the model was trained on: checked against the model, and the
            source of the card's grid, class names and dataset name where ``info`` leaves them blank.
        revision: the commit the card pins, when known.
        overwrite: replace an existing ``out_dir``.

    Returns:
        ``out_dir`` as a ``Path``.
    """
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a path, got {type(out_dir).__name__}")
    prepared = _prepare(
        model_dir,
        repo_id=repo_id,
        info=info,
        sampling=sampling,
        metrics=metrics,
        training_args=training_args,
        codebook_dir=codebook_dir,
        data_dir=data_dir,
        eval_sampling=eval_sampling,
        template_path=template_path,
    )
    return _write_folder(prepared, Path(out_dir), revision, overwrite)


# ---------------------------------------------------------------------------------------------
# The push
# ---------------------------------------------------------------------------------------------


def push_to_hub(
    model_dir: str | os.PathLike[str],
    repo_id: str,
    *,
    info: CardInfo | None = None,
    sampling: SamplingSettings | None = None,
    metrics: Mapping[str, Any] | None = None,
    training_args: Mapping[str, Any] | None = None,
    codebook_dir: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    eval_sampling: str | None = None,
    template_path: str | os.PathLike[str] | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    pin_revision: bool = True,
    token: str | None = None,
    api: Any | None = None,
) -> str:
    """Upload a trained prior to ``repo_id`` and return the sha of the commit that holds it.

    The uploaded files are exactly those of ``prepare_upload_folder`` (``--dry-run`` shows them);
    files of an earlier push that could contradict them (weights, shards, code, the codebook) are
    deleted in the same commit. With ``pin_revision`` a second commit then changes only README.md,
    so that the card's snippets load ``revision=<that sha>``: code and weights exactly as uploaded.

    Args:
        token: a Hub token; ``None`` lets huggingface_hub find one (``HF_TOKEN``, or the login stored
            by ``hf auth login``). It is never written to disk or logged.
        api: an ``huggingface_hub.HfApi`` to use instead of a new one (tests pass a fake).
        private: create the repo private (an existing repo keeps its visibility).
        Other arguments: see ``prepare_upload_folder``.
    """
    from huggingface_hub import HfApi

    repo_id = _check_repo_id(repo_id)
    _check_text("commit_message", commit_message)
    prepared = _prepare(
        model_dir,
        repo_id=repo_id,
        info=info,
        sampling=sampling,
        metrics=metrics,
        training_args=training_args,
        codebook_dir=codebook_dir,
        data_dir=data_dir,
        eval_sampling=eval_sampling,
        template_path=template_path,
    )
    api = HfApi(token=token) if api is None else api
    with tempfile.TemporaryDirectory(prefix="codegpt-push-") as tmp:
        folder = _write_folder(prepared, Path(tmp) / "upload", revision=None, overwrite=False)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        message = (
            commit_message or f"Upload codegpt prior ({_format_count(prepared.model.num_parameters())} parameters)"
        )
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            commit_message=message,
            delete_patterns=_STALE_PATTERNS,
        )
    sha = commit.oid
    if pin_revision:
        card = prepared.card(revision=sha)
        api.upload_file(
            path_or_fileobj=str(card).encode("utf-8"),
            path_in_repo=README_NAME,
            repo_id=repo_id,
            repo_type="model",
            commit_message=f"Model card: pin revision {sha[:10]}",
        )
    return sha


# ---------------------------------------------------------------------------------------------
# Loading the codebook of a repo
# ---------------------------------------------------------------------------------------------


def load_codebook(
    repo_or_path: str | os.PathLike[str],
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    token: str | None = None,
) -> Any:
    """The ``Codebook`` shipped with a prior, from a folder or a Hub repo id (cache-aware).

    ``repo_or_path`` is an upload folder or a repo id (its ``codebook/`` subfolder is used), or a
    saved codebook folder itself. ``codebook.decode(codes)`` then maps codes to latents; with
    ``HF_HUB_OFFLINE=1`` a repo id is read from the local cache.
    """
    from huggingface_hub import snapshot_download

    from .codebook import Codebook

    if not isinstance(repo_or_path, (str, os.PathLike)):
        raise TypeError(f"repo_or_path must be a repo id or a path, got {type(repo_or_path).__name__}")
    path = Path(repo_or_path)
    if not path.is_dir():
        repo_id = _check_repo_id(str(repo_or_path))
        path = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                token=token,
                allow_patterns=[f"{CODEBOOK_DIR}/*"],
            )
        )
    for candidate in (path / CODEBOOK_DIR, path):
        config = candidate / "config.json"
        if config.is_file() and "num_codes" in read_json(config, "repo_or_path"):
            return Codebook.from_pretrained(candidate)
    raise FileNotFoundError(
        f"repo_or_path: {str(repo_or_path)!r} has no codebook (no {CODEBOOK_DIR}/config.json with num_codes)"
    )


# ---------------------------------------------------------------------------------------------
# codegpt push
# ---------------------------------------------------------------------------------------------


def _grid_arg(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)[xX×](\d+)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"--grid must look like HxW (e.g. 16x16), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def add_push_parser(subparsers: Any) -> None:
    """Add ``codegpt push`` to an ``argparse`` subparsers object (``func`` returns an exit code)."""
    p = subparsers.add_parser(
        "push",
        help="share a trained prior on the Hugging Face Hub (model card, weights, code, codebook)",
        description=(
            "Render the model card and upload the model (safetensors, config.json with auto_map, the two "
            "remote-code files, generation_config.json) and its codebook. The token comes from HF_TOKEN "
            "or `hf auth login`; it is never taken on the command line or written anywhere."
        ),
    )
    p.add_argument("model_dir", help="a training run folder, one of its checkpoints, or a save_pretrained folder")
    p.add_argument("--repo-id", required=True, help="the Hub repo, org/name")
    p.add_argument("--dry-run", metavar="OUT_DIR", help="write the exact upload folder here and upload nothing")
    p.add_argument("--overwrite", action="store_true", help="with --dry-run: replace an existing OUT_DIR")
    p.add_argument(
        "--metrics", metavar="JSON", help="metrics: a JSON object or a .jsonl log (default: the run's own evaluation)"
    )
    p.add_argument(
        "--training-args", metavar="JSON", help="training settings JSON (default: the run's training_args.json)"
    )
    p.add_argument("--codebook", metavar="DIR", help="a saved codebook folder, shipped in codebook/")
    p.add_argument("--data", metavar="DIR", help="the code dataset trained on (its grid, class names and description)")
    p.add_argument("--license", default="apache-2.0", help="Hub license id (default: apache-2.0)")
    p.add_argument("--model-name", help="card title and model-index name (default: the repo name)")
    p.add_argument("--description", help="a paragraph under the card's title")
    p.add_argument("--dataset-id", help="training data id (a Hub dataset id or a short name)")
    p.add_argument("--dataset-name", help="training data's human name")
    p.add_argument("--dataset-split", default="validation", help="split the metrics were measured on")
    p.add_argument("--class-names", help="comma-separated class names, in class-id order")
    p.add_argument("--grid", type=_grid_arg, help="code grid HxW (default: square seq_len)")
    p.add_argument("--decoder", help="what turns codes into pixels (needed without --codebook)")
    p.add_argument("--base-model", help="Hub repo of the VQ tokenizer / autoencoder the codes come from")
    p.add_argument("--tag", action="append", default=[], help="an extra Hub tag (repeatable)")
    p.add_argument("--template", help="a model card template instead of codegpt's model_card.md")
    g = p.add_argument_group("recommended sampling settings (saved in generation_config.json)")
    g.add_argument("--temperature", type=float, help="0 is greedy (default: the run's sample temperature, or 1)")
    g.add_argument("--top-k", type=int, default=None, help="keep the k most likely codes (default: off)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default: off)")
    g.add_argument(
        "--guidance-scale", type=float, help="classifier-free guidance (default: the run's sample guidance, or off)"
    )
    g.add_argument("--eval-sampling", help="the settings behind sample-based metrics on the card, as text")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--commit-message", help="message of the upload commit")
    p.add_argument("--no-pin", action="store_true", help="do not pin the card's snippets to the upload commit")
    p.set_defaults(func=run_push)


def run_push(args: argparse.Namespace) -> int:
    """``codegpt push``: a dry run writes the folder; otherwise upload and print the commit.

    Bad inputs print one line naming the argument and return 2, as argparse does for bad flags; a
    refused or impossible upload (offline mode, no or a wrong token, no rights) prints the Hub's
    answer and returns 1.
    """
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        return _run_push(args)
    except (FileNotFoundError, FileExistsError, ValueError, TypeError) as err:
        print(f"codegpt push: error: {err}", file=sys.stderr)
        return 2
    except (OfflineModeIsEnabled, HfHubHTTPError) as err:
        print(f"codegpt push: upload failed: {err}", file=sys.stderr)
        return 1


def _run_push(args: argparse.Namespace) -> int:
    run = resolve_run(args.model_dir)
    metrics = read_json(args.metrics, "--metrics") if args.metrics else None
    training_args = read_json(args.training_args, "--training-args") if args.training_args else None
    class_names = [n.strip() for n in args.class_names.split(",")] if args.class_names else None
    info = CardInfo(
        license=args.license,
        model_name=args.model_name,
        description=args.description,
        dataset_id=args.dataset_id,
        dataset_name=args.dataset_name,
        dataset_split=args.dataset_split,
        class_names=class_names,
        grid_shape=args.grid,
        decoder=args.decoder,
        base_model=args.base_model,
        tags=tuple(args.tag),
    )
    # Flags given on the command line replace single settings of the run's own (see --help).
    _check_model_type(run.model_dir)
    base = _sampling_from_training_args(
        training_args if training_args is not None else run.training_args,
        GPTConfig.from_pretrained(run.model_dir),
    )
    flags = {
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "guidance_scale": args.guidance_scale,
    }
    sampling = replace(base, **{k: v for k, v in flags.items() if v is not None})
    common = {
        "info": info,
        "sampling": sampling,
        "metrics": metrics,
        "training_args": training_args,
        "codebook_dir": args.codebook,
        "data_dir": args.data,
        "eval_sampling": args.eval_sampling,
        "template_path": args.template,
    }
    if args.dry_run:
        out = prepare_upload_folder(
            args.model_dir,
            args.dry_run,
            repo_id=args.repo_id,
            overwrite=args.overwrite,
            **common,
        )
        print(f"dry run: wrote the upload folder for {args.repo_id} to {out}")
        for name in upload_file_names(args.codebook is not None):
            print(f"  {name}")
        return 0
    sha = push_to_hub(
        args.model_dir,
        args.repo_id,
        private=args.private or None,
        commit_message=args.commit_message,
        pin_revision=not args.no_pin,
        **common,
    )
    print(f"pushed {args.repo_id} at revision {sha}")
    print(
        f'load it with AutoModelForCausalLM.from_pretrained("{args.repo_id}", revision="{sha}", trust_remote_code=True)'
    )
    return 0
