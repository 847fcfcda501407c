"""Share a trained prior on the Hugging Face Hub: the model card (huggingface_hub's ``ModelCard`` from
the ``model_card.md`` template) and exactly the folder ``push_to_hub`` uploads. ``codegpt push`` is in
``codegpt.cli``. Tokens: this module never writes or logs one; ``token=`` or huggingface_hub's own
lookup (``HF_TOKEN``, ``hf auth login``) supplies it.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import huggingface_hub
import transformers
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from . import __version__
from . import sampling as _sampling
from ._util import check_path, read_json, replace_dir, write_text
from .codebook import Codebook
from .configuration_codegpt import GPTConfig
from .data import _read_metadata  # private: data.py's one reader of dataset.json
from .runs import load_model, resolve_run

__all__ = [
    "AUTOENCODER_DIR", "CODEBOOK_DIR", "CardInfo", "EvalMetric", "SamplingSettings", "TESTED_TRANSFORMERS",
    "eval_sampling_text", "load_codebook", "prepare_upload_folder", "push_to_hub", "render_model_card",
    "run_sampling", "select_metrics", "upload_file_names",
]

# The oldest and newest transformers releases the remote-code files are tested against (.ci/compat.sh).
TESTED_TRANSFORMERS = ("4.57.6", "5.24.0")
MIN_TORCH = "2.4"

CODEBOOK_DIR = "codebook"
README_NAME = "README.md"
_MODEL_FILES = ("config.json", "configuration_codegpt.py", "generation_config.json", "model.safetensors",
                "modeling_codegpt.py")
_CODEBOOK_FILES = ("config.json", "model.safetensors")
# A diffusers autoencoder saved in a local folder ships beside its codebook, so the Hub model decodes anywhere.
AUTOENCODER_DIR = "autoencoder"
_AUTOENCODER_FILES = ("config.json", "diffusion_pytorch_model.safetensors")

# Files a previous push may have left that would shadow or contradict the new ones (stale shards
# with their index, pickled weights, old model code); other files a user added to the repo are kept.
_STALE_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.bin", "*.pt", "*.pth", "*.ckpt",
                   "configuration_*.py", "modeling_*.py", f"{CODEBOOK_DIR}/*", f"{AUTOENCODER_DIR}/*"]

PIPELINE_TAG = "unconditional-image-generation"
_BASE_TAGS = ("codegpt", "image-generation", "image-tokens", "vq", "custom_code")

# Training-argument keys whose values must never reach a public card.
_SECRET_KEY = re.compile(r"token|secret|password|passwd|api[_-]?key|credential|auth", re.IGNORECASE)
_LICENSE = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")
# A revision is pasted into Python code on the card: a branch, tag or commit name, never a quote.
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")

# Names of the figures codegpt computes (codegpt.training, codegpt.evaluation.evaluate_prior, `codegpt eval
# --fid`) whose key alone would not say what they measure; other keys are shown capitalised.
_SAMPLE_SETS = {"guided": "guided samples", "unguided": "unguided samples", "unconditional": "samples"}
_PER_SAMPLE_SET = {
    "class_consistency": "Class consistency, {} (judged)",
    "novelty": "Novelty, {} (not a training image)",
    "fid": "FID, {} vs held-out images",
    "kid_mean": "KID, {} vs held-out images",
    "inception_score_mean": "Inception Score, {}",
}
_METRIC_NAMES = {
    "loss_nats": "Cross-entropy (nats per code)",
    "baseline_bits_per_code": "Bits per code of an independent per-position baseline",
    "bits_ratio": "Bits per code / baseline's",
    "judge_accuracy": "Judge accuracy, held-out images through the codebook",
    "judge_accuracy_real": "Judge accuracy, real held-out images",
    "codebook_mse": "Codebook reconstruction MSE, held out",
    "codebook_mse_train": "Codebook reconstruction MSE, training split",
    **{f"{key}_{kind}": name.format(samples) for key, name in _PER_SAMPLE_SET.items()
       for kind, samples in _SAMPLE_SETS.items()},
    "fid_reconstruction": "Reconstruction FID, held-out images through autoencoder + codebook (the ceiling)",
    "fid_autoencoder": "Reconstruction FID, held-out images through the autoencoder alone",
    "mse_reconstruction": "Reconstruction MSE (pixels in [0, 1]), through autoencoder + codebook",
    "mse_autoencoder": "Reconstruction MSE (pixels in [0, 1]), through the autoencoder alone",
}
# The feature network behind FID/KID/IS, a text next to them in a metrics record (`codegpt eval --fid`).
_FEATURE_NETWORK_KEYS = ("fid_feature_network", "feature_network")
# Metrics measured on samples, whose value depends on the sampling settings: a card must state them.
_SAMPLE_BASED = re.compile(r"fid|inception|precision|recall|novelty|consistency|distinct|diversity")
_IMAGE_METRIC = re.compile(r"fid|kid|inception")
# Numbers a training log holds next to its metrics that say nothing about the model's quality.
_BOOKKEEPING = re.compile(
    r"(^|_)(step|steps|epoch|epochs|runtime|seconds|time|samples_per_second|steps_per_second|"
    r"tokens_per_second|lr|learning_rate|grad_norm|num_tokens|num_codes|num_samples|world_size|seed|num_real|"
    r"num_fake|num_images|std_guided|std_unguided|std_unconditional)$"
)
_SPLIT_PREFIXES = {"eval_": "validation", "val_": "validation", "valid_": "validation", "test_": "test"}
# Training arguments about where and how a run was launched, not about the model (output_dir would
# also publish a local path).
_OPERATIONAL_ARGS = frozenset(
    {"output_dir", "overwrite_output_dir", "resume", "progress", "num_workers", "log_every", "logging_dir",
     "init_from_dir", "report_to"}
)


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
        _sampling.check_sampling_args(self.temperature, self.top_k, self.top_p, self.guidance_scale, config)

    @property
    def guided(self) -> bool:
        return self.guidance_scale is not None and self.guidance_scale != 1

    @property
    def nucleus(self) -> bool:
        return self.top_p is not None and self.top_p < 1

    def generation_kwargs(self) -> dict[str, Any]:
        """The ``GenerationConfig`` fields these settings set."""
        if self.temperature == 0:
            # Greedy: sampling knobs would make GenerationConfig's validation refuse to save.
            kwargs: dict[str, Any] = {"do_sample": False}
        else:
            # top_k stated even when off: generate() adds top_k=50 on its own when it is unset.
            kwargs = {"do_sample": True, "temperature": float(self.temperature), "top_k": int(self.top_k or 0)}
            if self.nucleus:
                kwargs["top_p"] = float(self.top_p)
        if self.guided:
            kwargs["guidance_scale"] = float(self.guidance_scale)
        return kwargs

    def summary(self, class_conditional: bool = True) -> str:
        """One line for the card, e.g. ``temperature 1, top-k off, top-p off, guidance off``."""
        parts = ["greedy (do_sample=False)"] if self.temperature == 0 else [
            f"temperature {float(self.temperature):g}",
            f"top-k {self.top_k}" if self.top_k else "top-k off",
            f"top-p {float(self.top_p):g}" if self.nucleus else "top-p off",
        ]
        if class_conditional:
            parts.append(f"guidance scale {float(self.guidance_scale):g}" if self.guided else "guidance off")
        return ", ".join(parts)


def run_sampling(training_args: Mapping[str, Any] | None, config: GPTConfig) -> SamplingSettings:
    """The settings a run drew its sample grids with (``sample_temperature``,
    ``sample_guidance_scale`` of its training arguments), else the plain defaults."""
    args = training_args or {}
    guidance = args.get("sample_guidance_scale") if config.class_conditional else None
    return SamplingSettings(temperature=args.get("sample_temperature", 1.0), guidance_scale=guidance)


def _arg(default: Any, text: str) -> Any:
    return field(default=default, metadata={"help": text})  # shown by `codegpt push --help` (HfArgumentParser)


@dataclass(frozen=True)
class CardInfo:
    """What a card says that the model's config cannot (each field's help is also a flag of ``codegpt push``)."""

    license: str = _arg("apache-2.0", "Hub license id, e.g. apache-2.0, mit or other")
    model_name: str | None = _arg(None, "card title and model-index name (default: repo name)")
    description: str | None = _arg(None, "a paragraph under the card's title")
    dataset_id: str | None = _arg(None, "training data id (a Hub dataset id, or a short name such as sklearn-digits); "
                                        "needed for evaluation results (it is their dataset.type)")
    dataset_name: str | None = _arg(None, "training data's human name (default: its id)")
    dataset_split: str = _arg("validation", "the split the metrics were measured on")
    class_names: Sequence[str] | None = _arg(None, "class names, in class-id order")
    grid_shape: tuple[int, int] | None = _arg(None, "code grid HxW, H*W = seq_len (default: a square seq_len)")
    decoder: str | None = _arg(None, "what turns codes into pixels: needed when no codebook is shipped")
    base_model: str | None = _arg(None, "Hub repo of the VQ tokenizer / autoencoder the codes come from")
    tags: Sequence[str] = field(default_factory=list, metadata={"help": "extra Hub tags"})


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
    nested = [metrics[key] for key in ("final", "eval", "metrics") if isinstance(metrics.get(key), Mapping)]
    if nested:
        return _quality_items(nested[0], default_split)
    history = metrics.get("history")
    if isinstance(history, list):
        rows = [row for row in history if isinstance(row, Mapping) and _quality_items(row, default_split)]
        return _quality_items(rows[-1], default_split) if rows else []
    return _quality_items(metrics, default_split)


def _quality_items(record: Mapping[str, Any], default_split: str) -> list[EvalMetric]:
    out = []
    for raw_key, value in record.items():
        if not isinstance(raw_key, str) or _BOOKKEEPING.search(raw_key) or raw_key.startswith("train_"):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # nested records, strings and flags are not metrics
        if not math.isfinite(value):
            raise ValueError(f"metrics[{raw_key!r}] must be a finite number, got {value!r}")
        prefix = next((p for p in _SPLIT_PREFIXES if raw_key.startswith(p)), "")
        split = _SPLIT_PREFIXES.get(prefix, default_split)
        out.append(EvalMetric(key=raw_key[len(prefix) :], value=float(value), split=split))
    return sorted(out, key=lambda m: (m.split, m.key))


def _check_repo_id(repo_id: object, name: str = "repo_id") -> str:
    if not isinstance(repo_id, str):
        raise TypeError(f"{name} must be a str such as 'org/name', got {type(repo_id).__name__}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"{name} {repo_id!r} is not a valid Hub repo id: {err}") from None
    return repo_id


def _check_text(name: str, value: object) -> None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if value is not None and not value.strip():
        raise ValueError(f"{name} must not be empty")


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
        if key in _OPERATIONAL_ARGS or _SECRET_KEY.search(key) or (isinstance(value, str) and value.startswith("hf_")):
            continue  # a local path, or a token pasted into a config, must not end up on a public card
        if key == "init_from" and "init_from_dir" in training_args:
            continue  # fine-tuned from a local folder: its path says nothing to a reader of the card
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


def _class_names(config: GPTConfig, names: Sequence[str] | None) -> list[str] | None:
    if names is None:
        return None
    if not config.class_conditional:
        raise ValueError("class_names were given for an unconditional model (config.class_conditional=False)")
    names = list(names)
    if len(names) != config.num_classes or not all(isinstance(n, str) and n.strip() for n in names):
        raise ValueError(f"class_names must be {config.num_classes} non-empty strings (num_classes), got {names!r}")
    # Names that only repeat the ids (the digits' "0".."9") would make a table that says nothing.
    return None if names == [str(i) for i in range(len(names))] else [_cell(n) for n in names]


def _decoder_text(config: GPTConfig, codebook: Codebook | None, decoder: str | None) -> str:
    if codebook is None and decoder is None:
        raise ValueError(
            "decoder: a card must say what turns the codes into pixels; ship the codebook "
            "(codebook_dir / --codebook) or describe the decoder (CardInfo.decoder / --decoder)"
        )
    if codebook is not None and getattr(codebook, "num_codes", None) != config.codebook_size:
        raise ValueError(
            f"codebook has {getattr(codebook, 'num_codes', None)} codes but the model's codebook_size is "
            f"{config.codebook_size}; a prior only decodes with the codebook it was trained on"
        )
    return decoder or "turn the latents into pixels with the decoder of the autoencoder the codebook was fitted on."


def eval_sampling_text(settings: Mapping[str, Any], class_conditional: bool = True) -> str:
    """The card's line on how the sample-based metrics were sampled, from the ``settings`` record that
    ``codegpt eval --out`` and ``codegpt demo`` write next to them: ``samples_per_class``, ``temperature``
    (default 1), ``top_k`` and ``top_p`` (default off), ``guidance_scale`` of the guided set (None: no
    guided set)."""
    temperature, top_k, top_p = settings.get("temperature", 1.0), settings.get("top_k"), settings.get("top_p")
    guidance, count = settings.get("guidance_scale"), settings["samples_per_class"]
    for name, value in (("temperature", temperature), ("top_k", top_k or 0), ("top_p", top_p or 1),
                        ("guidance_scale", guidance or 1), ("samples_per_class", count)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"metrics['settings'][{name!r}] must be a number >= 0, got {value!r}")
    text = f"temperature {temperature:g}, " + (f"top-k {top_k}" if top_k else "top-k off")
    text += f", top-p {top_p:g}" if top_p is not None and top_p < 1 else ""
    text += f", {count} samples per class" if class_conditional else f", {count} samples"
    if class_conditional and guidance is not None:
        text += f"; guided figures at guidance scale {guidance:g}, unguided ones without guidance"
    return text


def _results(
    metrics: Mapping[str, Any] | None, info: CardInfo, eval_sampling: str | None, class_conditional: bool = True
) -> tuple[list[EvalMetric], str | None, str | None]:
    """The card's quality metrics, the sampling settings behind the sample-based ones, and the feature
    network behind FID/KID/IS (``codegpt eval --fid`` records it next to the metrics)."""
    if metrics is None:
        return [], eval_sampling, None
    results = select_metrics(metrics, info.dataset_split)
    if not results:
        raise ValueError(
            f"metrics holds no quality metric (finite numbers such as 'eval_bits_per_code'), "
            f"got keys {sorted(map(str, metrics))}"
        )
    sample_based = [m.key for m in results if _SAMPLE_BASED.search(m.key)]
    settings = metrics.get("settings")
    if not eval_sampling:  # the settings record `codegpt eval --out` and `codegpt demo` write next to the figures
        eval_sampling = None
        if sample_based and isinstance(settings, Mapping) and "samples_per_class" in settings:
            eval_sampling = eval_sampling_text(settings, class_conditional)
    if sample_based and eval_sampling is None:
        raise ValueError(
            f"eval_sampling: the sample-based metrics {sample_based} need the sampling settings they were "
            "measured with (eval_sampling / --eval-sampling, e.g. 'temperature 1, top-k off, guidance 2, "
            "100 samples per class')"
        )
    if info.dataset_id is None:
        raise ValueError(
            "dataset_id: evaluation results need the id of the data they were measured on "
            "(CardInfo.dataset_id / --dataset-id), e.g. 'sklearn-digits'"
        )
    records = [r for r in (metrics.get("final"), metrics.get("eval"), metrics.get("metrics"), metrics)
               if isinstance(r, Mapping)]
    networks = [r[key] for r in records for key in _FEATURE_NETWORK_KEYS if isinstance(r.get(key), str)]
    image_based = any(_IMAGE_METRIC.search(m.key) for m in results)
    return results, eval_sampling, networks[0] if networks and image_based else None


def render_model_card(
    config: GPTConfig,
    *,
    repo_id: str,
    info: CardInfo | None = None,
    sampling: SamplingSettings | None = None,
    metrics: Mapping[str, Any] | None = None,
    training_args: Mapping[str, Any] | None = None,
    codebook: Codebook | None = None,
    num_parameters: int | None = None,
    revision: str | None = None,
    eval_sampling: str | None = None,
    template_path: str | os.PathLike[str] | None = None,
    autoencoder: Mapping[str, Any] | None = None,
) -> ModelCard:
    """Render the model card (a ``huggingface_hub.ModelCard``) of a trained prior.

    ``repo_id`` and ``revision`` go into the card's snippets (``None``: ``main``, with a note to pin
    one); ``info`` says what the config cannot (see ``CardInfo``); ``sampling`` the recommended
    settings of ``generation_config.json``; ``metrics`` a run's record (see ``select_metrics``),
    whose quality metrics fill a table and the ``model-index``; ``training_args`` a table (secrets and
    local paths left out); ``codebook`` the ``Codebook`` shipped in ``codebook/``; ``autoencoder`` the
    spec of the autoencoder it was fitted on (``codegpt.autoencoders``), as shipped; ``eval_sampling``
    the settings behind sample-based metrics. ``template_path`` replaces codegpt's ``model_card.md``:
    it sees the card data's fields and the names passed here (an unknown name is an error).

    Raises ``TypeError``/``ValueError`` naming a missing or malformed input, and ``FileNotFoundError``
    for a missing template.
    """
    import jinja2.meta  # what ModelCard.from_template renders with; optional, as in huggingface_hub

    repo_id = _check_repo_id(repo_id)
    info = CardInfo() if info is None else info
    sampling = SamplingSettings() if sampling is None else sampling
    if not isinstance(config, GPTConfig):
        raise TypeError(f"config must be a codegpt GPTConfig, got {type(config).__name__}")
    for name, value, cls in (("info", info, CardInfo), ("sampling", sampling, SamplingSettings)):
        if not isinstance(value, cls):
            raise TypeError(f"{name} must be a {cls.__name__}, got {type(value).__name__}")
    sampling.check(config)
    if not isinstance(info.license, str) or not _LICENSE.match(info.license):
        raise ValueError(
            f"license must be a Hub license id in lower case such as 'apache-2.0', 'mit' or 'other', "
            f"got {info.license!r}"
        )
    for name in ("model_name", "description", "dataset_id", "dataset_name", "dataset_split", "decoder", "base_model"):
        _check_text(name, getattr(info, name))
    if info.base_model is not None:
        _check_repo_id(info.base_model, "base_model")
    if revision is not None and (not isinstance(revision, str) or not _REVISION.match(revision)):
        raise ValueError(f"revision must be a branch, tag or commit sha such as 'main', got {revision!r}")
    grid = _grid(config, info.grid_shape)
    class_names = _class_names(config, info.class_names)
    decoder = _decoder_text(config, codebook, info.decoder)
    results, eval_sampling, feature_network = _results(metrics, info, eval_sampling, config.class_conditional)
    _check_text("eval_sampling", eval_sampling)

    model_name = info.model_name or repo_id.split("/")[-1]
    dataset_name = info.dataset_name or info.dataset_id
    conditional = ["class-conditional"] if config.class_conditional else []
    card_data = ModelCardData(
        license=info.license,
        library_name="transformers",
        pipeline_tag=PIPELINE_TAG,
        tags=list(dict.fromkeys([*_BASE_TAGS, *conditional, *info.tags])),
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
        # Extra keys go to the YAML as they are.
        codebook_size=config.codebook_size,
        seq_len=config.seq_len,
        num_classes=config.num_classes,
        **({"grid": list(grid)} if grid is not None else {}),
    )
    context = dict(
        config=config, model_name=model_name, description=info.description or "", codegpt_version=__version__,
        repo_id=repo_id, revision=revision, grid=grid, class_names=class_names, codebook=codebook, decoder=decoder,
        num_parameters=_format_count(num_parameters) if num_parameters else "not recorded",
        sampling_summary=sampling.summary(config.class_conditional), metrics=results, eval_sampling=eval_sampling,
        dataset_name=dataset_name, dataset_id=info.dataset_id, training_args=_training_rows(training_args),
        transformers_range=" and ".join(TESTED_TRANSFORMERS), min_torch=MIN_TORCH,
        autoencoder=autoencoder, autoencoder_dir=AUTOENCODER_DIR,
        feature_network=feature_network,
    )

    # The package carries the template (a link to the top-level model_card.md in a source checkout).
    path = Path(__file__).with_name("model_card.md") if template_path is None else Path(template_path)
    if not path.is_file():
        raise FileNotFoundError(f"template_path: no such file {str(path)!r} (codegpt push --template FILE)")
    template = path.read_text(encoding="utf-8")
    # from_template renders with Jinja's lenient defaults: a misspelt name would vanish silently.
    try:
        names = jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template))
    except jinja2.TemplateSyntaxError as err:
        raise ValueError(f"template_path: {str(path)!r} line {err.lineno}: {err.message}") from None
    unknown = sorted(names - {"card_data", *context, *card_data.to_dict()})
    if unknown:
        raise ValueError(f"template_path: {str(path)!r} uses values the card does not provide: {unknown}")
    try:
        card = ModelCard.from_template(card_data, template_str=template, **context)
    except Exception as err:  # yaml.YAMLError and huggingface_hub's ValueErrors alike
        raise ValueError(f"the rendered model card's metadata does not parse: {err}") from None
    if card.data.to_dict().get("library_name") != "transformers":
        raise ValueError(f"template_path: {str(path)!r} must start with a '---' block holding {{{{ card_data }}}}")
    card.text = re.sub(r"\n{3,}", "\n\n", card.text)  # Jinja blocks leave runs of blank lines behind
    return card


def upload_file_names(with_codebook: bool, with_autoencoder: bool = False) -> list[str]:
    """Every file an upload folder holds, as paths relative to it, sorted."""
    codebook = [f"{CODEBOOK_DIR}/{name}" for name in _CODEBOOK_FILES] if with_codebook else []
    autoencoder = [f"{AUTOENCODER_DIR}/{name}" for name in _AUTOENCODER_FILES] if with_autoencoder else []
    return sorted([README_NAME, *_MODEL_FILES, *codebook, *autoencoder])


def _local_autoencoder(spec: Mapping[str, Any] | None, repo_id: str) -> tuple[Path | None, dict | None]:
    """A recorded diffusers autoencoder saved in a local folder: (that folder, the spec as shipped in the
    repo's ``autoencoder/``). Its weights fingerprint stays: loading it back checks them."""
    if not spec or spec.get("kind") != "diffusers" or not (spec.get("source") and Path(spec["source"]).is_dir()):
        return None, dict(spec) if spec else None  # nothing to ship (a Hub id loads from there)
    folder = Path(spec["source"]) / (spec.get("subfolder") or "")
    missing = [name for name in _AUTOENCODER_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"the codebook's autoencoder folder {folder} lacks {missing}: save it with "
                                "save_pretrained (safetensors) to ship it with the model")
    return folder, {**spec, "source": repo_id, "subfolder": AUTOENCODER_DIR, "revision": None}


def _with_dataset(info: CardInfo, data_dir: str | os.PathLike[str], config: GPTConfig) -> CardInfo:
    """``info`` with the blanks (grid, class names, dataset name) filled from a code dataset folder
    that fits the model (or an ``encode_images`` folder: its ``train/``)."""
    data_dir = Path(data_dir)
    if (data_dir / "encoding.json").is_file():
        data_dir = data_dir / "train"
    meta = _read_metadata(data_dir)
    if meta["codebook_size"] != config.codebook_size:
        raise ValueError(
            f"data_dir: the dataset's codebook_size is {meta['codebook_size']} but the model's is "
            f"{config.codebook_size}; this is not the data the model was trained on"
        )
    if meta["num_classes"] != config.num_classes:
        raise ValueError(f"data_dir: the dataset has {meta['num_classes']} classes but the model {config.num_classes}")
    return replace(
        info,
        dataset_name=info.dataset_name or meta.get("description") or None,
        grid_shape=info.grid_shape or tuple(meta["grid"]),
        class_names=info.class_names if info.class_names is not None else meta.get("class_names"),
    )


def _prepare(
    model_dir: str | os.PathLike[str],
    *,
    repo_id: str,
    info: CardInfo | None = None,
    sampling: SamplingSettings | Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    training_args: Mapping[str, Any] | None = None,
    codebook_dir: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    eval_sampling: str | None = None,
    template_path: str | os.PathLike[str] | None = None,
) -> tuple[Any, Codebook | None, SamplingSettings, functools.partial, tuple[dict | None, Path | None]]:
    """The model, codebook, sampling settings, card (a function of the revision it pins), the extra
    codebook config (the autoencoder it was fitted on) and the local autoencoder folder to ship, each
    checked before anything is written."""
    run = resolve_run(model_dir)
    model = load_model(run.model_dir, device="cpu")
    # Explicit inputs win over what the run recorded; an empty mapping means "none".
    metrics = run.metrics if metrics is None else (metrics or None)
    training_args = run.training_args if training_args is None else (training_args or None)
    if not isinstance(sampling, SamplingSettings):
        sampling = replace(run_sampling(training_args, model.config), **(sampling or {}))
    info = CardInfo() if info is None else info
    if data_dir is not None:
        info = _with_dataset(info, data_dir, model.config)
    codebook, codebook_config, autoencoder_dir = None, None, None
    if codebook_dir is not None:
        if not isinstance(codebook_dir, (str, os.PathLike)) or not Path(codebook_dir).is_dir():
            raise FileNotFoundError(f"codebook_dir: no such directory {str(codebook_dir)!r}")
        codebook = Codebook.from_pretrained(codebook_dir)
        # The autoencoder the codebook was fitted on (`codegpt encode` records it) ships with it.
        recorded = read_json(Path(codebook_dir) / "config.json", "codebook_dir").get("autoencoder")
        beside = Path(codebook_dir).parent
        if recorded and recorded.get("subfolder") == AUTOENCODER_DIR and (beside / AUTOENCODER_DIR).is_dir():
            # An upload folder or a Hub snapshot (a re-push): its autoencoder/ ships again, as the new repo's.
            recorded = {**recorded, "source": str(beside), "revision": None}
        autoencoder_dir, recorded = _local_autoencoder(recorded, repo_id)
        codebook_config = {"autoencoder": recorded} if recorded else None
    card = functools.partial(
        render_model_card, model.config, repo_id=repo_id, info=info, sampling=sampling, metrics=metrics,
        training_args=training_args, codebook=codebook, num_parameters=model.num_parameters(),
        autoencoder=codebook_config and codebook_config["autoencoder"],
        eval_sampling=eval_sampling, template_path=template_path,
    )
    card(revision=None)
    return model, codebook, sampling, card, (codebook_config, autoencoder_dir)


def _write_folder(prepared: tuple, out_dir: Path, revision: str | None, overwrite: bool) -> Path:
    model, codebook, sampling, card, (codebook_config, autoencoder_dir) = prepared
    cfg = model.config
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
        gen.update(**sampling.generation_kwargs())
        gen._from_model_config = False  # hand-set now: generate() must not re-derive it from config.json
        gen.validate()
        model.save_pretrained(tmp)
        if codebook is not None:
            codebook.save_pretrained(tmp / CODEBOOK_DIR, config=codebook_config)
            (tmp / CODEBOOK_DIR / README_NAME).unlink(missing_ok=True)  # the repo has one card: the model's
        if autoencoder_dir is not None:
            (tmp / AUTOENCODER_DIR).mkdir()
            for name in _AUTOENCODER_FILES:
                shutil.copyfile(autoencoder_dir / name, tmp / AUTOENCODER_DIR / name)
        write_text(tmp / README_NAME, str(card(revision=revision)))
        written = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        expected = upload_file_names(codebook is not None, autoencoder_dir is not None)
        if written != expected:
            # Only the listed files may ever be uploaded (never optimizer state, never a token).
            raise RuntimeError(
                f"the upload folder holds {written}, expected exactly {expected}; "
                f"transformers {transformers.__version__} may save more files than codegpt knows"
            )
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def prepare_upload_folder(
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    repo_id: str,
    revision: str | None = None,
    overwrite: bool = False,
    **kwargs: Any,
) -> Path:
    """Write exactly the folder ``push_to_hub`` uploads (``upload_file_names``) to ``out_dir``; return it.

    The model is loaded and saved anew: nothing else in its folder (optimizer or Accelerate state)
    is carried along, and the code files and ``auto_map`` are the installed codegpt's. ``out_dir`` is
    built in a temporary sibling and renamed into place; it must not exist or be empty unless ``overwrite``.

    ``model_dir`` is a training run folder, one of its checkpoints, or any ``save_pretrained`` folder
    (``codegpt.runs.resolve_run``); a run also gives the metrics and training arguments, which
    ``metrics=``/``training_args=`` override (``{}`` leaves them off the card). ``sampling`` is a
    ``SamplingSettings`` or a mapping of single settings replacing the run's own (the temperature and
    guidance it drew its sample grids with). ``codebook_dir`` is a saved ``Codebook`` to ship;
    ``data_dir`` the code dataset trained on, checked against the model and filling the card's grid,
    class names and dataset name where ``info`` leaves them blank. ``revision``, ``info``,
    ``eval_sampling``, ``template_path``: see ``render_model_card``.
    """
    out_dir = check_path("out_dir", out_dir)
    return _write_folder(_prepare(model_dir, repo_id=repo_id, **kwargs), out_dir, revision, overwrite)


def push_to_hub(
    model_dir: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool | None = None,
    commit_message: str | None = None,
    pin_revision: bool = True,
    token: str | None = None,
    api: Any | None = None,
    **kwargs: Any,
) -> str:
    """Upload a trained prior to ``repo_id`` and return the sha of the commit that holds it.

    The uploaded files are exactly those of ``prepare_upload_folder`` (which takes the same
    ``kwargs``); files of an earlier push that could contradict them (weights, shards, code, the
    codebook) are deleted in the same commit. With ``pin_revision`` a second commit then changes only
    README.md, so that the card's snippets load ``revision=<that sha>``: code and weights as uploaded.
    ``private`` applies to a new repo only; ``token`` (never written or logged) and ``api`` (an
    ``HfApi``; tests pass a fake) default to huggingface_hub's own.
    """
    repo_id = _check_repo_id(repo_id)
    _check_text("commit_message", commit_message)
    prepared = _prepare(model_dir, repo_id=repo_id, **kwargs)
    model, _, _, card, _ = prepared
    message = commit_message or f"Upload codegpt prior ({_format_count(model.num_parameters())} parameters)"
    api = huggingface_hub.HfApi(token=token) if api is None else api
    with tempfile.TemporaryDirectory(prefix="codegpt-push-") as tmp:
        folder = _write_folder(prepared, Path(tmp) / "upload", revision=None, overwrite=False)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            commit_message=message,
            delete_patterns=_STALE_PATTERNS,
        )
    if pin_revision:
        api.upload_file(
            path_or_fileobj=str(card(revision=commit.oid)).encode("utf-8"),
            path_in_repo=README_NAME,
            repo_id=repo_id,
            repo_type="model",
            commit_message=f"Model card: pin revision {commit.oid[:10]}",
        )
    return commit.oid


def load_codebook(
    repo_or_path: str | os.PathLike[str],
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    token: str | None = None,
) -> Codebook:
    """The ``Codebook`` shipped with a prior in ``codebook/`` of an upload folder or a Hub repo id
    (``Codebook.from_pretrained(repo, subfolder="codebook")``, cache-aware), or a saved codebook folder
    itself. ``codebook.decode(codes)`` then maps codes to latents."""
    if not isinstance(repo_or_path, (str, os.PathLike)):
        raise TypeError(f"repo_or_path must be a repo id or a path, got {type(repo_or_path).__name__}")
    path = Path(repo_or_path)
    if not path.is_dir():
        return Codebook.from_pretrained(_check_repo_id(str(repo_or_path)), subfolder=CODEBOOK_DIR, revision=revision,
                                        cache_dir=cache_dir, local_files_only=local_files_only, token=token)
    for subfolder in (CODEBOOK_DIR, None):
        config = path / (subfolder or "") / "config.json"
        if config.is_file() and "num_codes" in read_json(config, "repo_or_path"):
            return Codebook.from_pretrained(path, subfolder=subfolder)
    raise FileNotFoundError(
        f"repo_or_path: {str(repo_or_path)!r} has no codebook (no {CODEBOOK_DIR}/config.json with num_codes)"
    )
