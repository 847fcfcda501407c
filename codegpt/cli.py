"""The ``codegpt`` command: demo, fit-codebook, train, sample, eval, push.

Each command is a thin layer over a library function (``codegpt.demo.run_demo``,
``codegpt.data.fit_code_dataset``, ``codegpt.training.train``, ``codegpt.runs.sample_classes``,
``codegpt.evaluation.evaluate_prior``, ``codegpt.hub.push_to_hub``). The flags of ``demo``,
``train`` and ``push`` are generated from the dataclasses they fill (``DemoSettings``;
``TrainingArguments`` and ``TrainInputs``; ``CardInfo``) by transformers' ``HfArgumentParser``, so a
flag's name, type and default are those of the field (``--save_every`` and ``--save-every`` alike);
``_FLAGS`` adds the short spellings of earlier releases, the help, and readers of values that are
not plain text or numbers. ``sample``, ``eval`` and ``fit-codebook`` fill no dataclass; their flags
are written out. ``train`` runs under ``accelerate launch -m codegpt train ...`` for several processes or
GPUs, and as a plain ``codegpt train ...`` on one.

Errors a user can fix (a missing dataset folder, a model config that does not fit the codes, a bad
value) are printed as one line ``codegpt COMMAND: error: ...`` with exit status 2; a refused upload
prints the Hub's answer with exit status 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import inspect
import math
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import HfArgumentParser

from . import __version__
from ._util import read_json, save_safetensors, write_json
from .codebook import Codebook
from .configuration_codegpt import GPTConfig
from .data import CodeDataset, fit_code_dataset
from .demo import DemoSettings, format_report, run_demo
from .digits import codes_to_images, digits_code_dataset, load_digits_images, patch_decoder
from .evaluation import digit_judge_accuracy, evaluate_prior, fit_digit_judge
from .hub import CardInfo, prepare_upload_folder, push_to_hub, upload_file_names
from .runs import load_model, render_codes, sample_classes, save_image_grid
from .training import TrainingArguments, check_compatible, config_for, train

__all__ = ["main", "build_parser", "CLIError", "TrainInputs"]

DEFAULT_VAL_FRACTION = 0.2
_GPT_DEFAULTS = {name: p.default for name, p in inspect.signature(GPTConfig.__init__).parameters.items()}


class CLIError(Exception):
    """An error the user can fix; printed without a traceback."""


_BAD_INPUT = (ValueError, TypeError, FileNotFoundError, FileExistsError)


@contextlib.contextmanager
def _user_errors(prefix: str = "", kinds: tuple[type[Exception], ...] = _BAD_INPUT) -> Iterator[None]:
    """Bad input found by the library (its message names the argument) becomes a one-line CLIError."""
    try:
        yield
    except kinds as err:
        raise CLIError(f"{prefix}{err}") from None


@dataclass
class TrainInputs:
    """What ``codegpt train`` reads besides ``TrainingArguments``: the data and the prior's shape.

    The model's vocabulary, sequence length and classes come from the dataset; the shape defaults
    are ``GPTConfig``'s.
    """

    data: str
    config: str | None = None
    embed_dim: int = _GPT_DEFAULTS["embed_dim"]
    num_layers: int = _GPT_DEFAULTS["num_layers"]
    num_heads: int = _GPT_DEFAULTS["num_heads"]
    dropout: float = _GPT_DEFAULTS["embd_dropout"]
    class_dropout: float = _GPT_DEFAULTS["class_dropout_prob"]
    unconditional: bool = False
    val_fraction: float = DEFAULT_VAL_FRACTION
    split_seed: int = 0
    codebook: str | None = None
    patch: int | None = None


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",")]


def _grid_arg(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)[xX×](\d+)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"must look like HxW (e.g. 16x16), got {text!r}")
    return int(match.group(1)), int(match.group(2))


# Per dataclass field, what HfArgumentParser cannot know: the spellings the hand-written parsers
# had (kept working), the help of fields that carry none, and how to read a value that is not a
# plain str/int/float. It adds --field_name and --field-name itself.
_FLAGS: dict[str, dict[str, Any]] = {
    # demo (DemoSettings) and train (TrainInputs)
    "embed_dim": {"help": "the prior's width"},
    "num_layers": {"aliases": ["--layers"], "help": "the prior's depth"},
    "num_heads": {"aliases": ["--heads"], "help": "attention heads"},
    "dropout": {"help": "embedding and residual dropout"},
    "class_dropout": {"help": "probability of training on the null class (for guidance)"},
    "val_fraction": {"help": "held out (of the codebook fit, of training) for evaluation; 0: none"},
    "split_seed": {"help": "seeds the train/val split"},
    "data": {"help": "code dataset folder (see `codegpt fit-codebook`)"},
    "config": {"help": "GPTConfig JSON file or model folder (replaces the shape flags)"},
    "unconditional": {"help": "ignore the dataset's classes"},
    "codebook": {"help": "saved patch codebook, to draw samples as pixels"},
    "out_dir": {"aliases": ["--out"], "help": "output folder (re-running overwrites it)"},
    "num_codes": {"help": "codebook size"},
    "patch": {"help": "patch side of the codebook's vectors (train: default √dim)"},
    "tie_embeddings": {"help": "one table for the input codes and the output head"},
    "steps": {"help": "optimizer steps"},
    "batch_size": {"help": "sequences per step"},
    "guidance_scale": {"help": "classifier-free guidance of the guided samples"},
    "grid_columns": {"help": "samples per row (class) in samples.png"},
    # train (TrainingArguments)
    "output_dir": {"aliases": ["--out"], "help": "run folder", "type": str},
    "max_steps": {"aliases": ["--steps"], "help": "optimizer steps"},
    "per_device_batch_size": {"aliases": ["--batch-size"], "help": "sequences per step and process"},
    "gradient_accumulation_steps": {"aliases": ["--grad-accum"], "help": "micro-batches per optimizer step"},
    "learning_rate": {"aliases": ["--lr"], "help": "peak learning rate"},
    "min_lr_ratio": {"help": "final lr / peak lr (cosine)"},
    "warmup_steps": {"help": "linear warmup (at most the number of steps)"},
    "weight_decay": {"help": "on matrices only"},
    "adam_epsilon": {"help": "AdamW epsilon"},
    "max_grad_norm": {"help": "gradient clipping; 0 turns it off"},
    "mixed_precision": {"help": "autocast: no (fp32), bf16 or fp16"},
    "seed": {"help": "seeds the weights, data order, dropout and samples"},
    "eval_every": {"help": "steps; 0: at the end only"},
    "eval_batch_size": {"help": "sequences per evaluation batch"},
    "save_every": {"help": "steps between checkpoints; 0: none"},
    "save_total_limit": {"help": "checkpoints kept"},
    "sample_every": {"help": "steps; 0: at the end only"},
    "samples_per_class": {"help": "samples per class (columns of the sample grids)"},
    "sample_guidance_scale": {"aliases": ["--guidance-scale"], "help": "classifier-free guidance of the sample grids"},
    "sample_temperature": {"help": "temperature of the sample grids"},
    "log_every": {"help": "steps between progress-bar updates"},
    "resume": {"help": "continue from the newest complete checkpoint in --out"},
    "overwrite_output_dir": {"help": "delete --out's checkpoints and start over"},
    "progress": {"help": "show a progress bar"},
    "num_workers": {"help": "DataLoader workers"},
    # push (CardInfo)
    "class_names": {"type": _names, "help": "comma-separated class names, in class-id order"},
    "grid_shape": {"aliases": ["--grid"], "type": _grid_arg},
    "tags": {"aliases": ["--tag"], "type": str, "action": "append", "help": "an extra Hub tag (repeatable)"},
}
# Fields with no command-line form (a pair of floats); they keep their dataclass default.
_NOT_FLAGS = {"adam_betas"}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, but not the uninformative ones (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.help is None:
            return action.help or ""
        return super()._get_help_string(action)


class _ArgumentParser(HfArgumentParser):
    """``HfArgumentParser`` with ``_FLAGS``'s extra spellings and help on each dataclass field."""

    @staticmethod
    def _parse_dataclass_field(parser: argparse.ArgumentParser, field: dataclasses.Field) -> None:
        if field.name in _NOT_FLAGS:
            return
        extra = dict(_FLAGS.get(field.name, {}))
        field = copy.copy(field)  # the dataclass's own field stays as it is
        field.type = extra.pop("type", field.type)  # HfArgumentParser reads a value with field.type
        field.metadata = {**field.metadata, **extra}
        HfArgumentParser._parse_dataclass_field(parser, field)


def _from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """The dataclass ``cls`` from the parsed flags; its own checks name a bad value."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    with _user_errors():
        return cls(**{**values, **overrides})


def _is_main_process() -> bool:
    # Under `accelerate launch` every process runs main(); only one should print.
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


def _print(*args: Any) -> None:
    if _is_main_process():
        print(*args, flush=True)


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated ints such as 0,3,7, got {text!r}") from None


def _open_dataset(path: str | os.PathLike) -> CodeDataset:
    try:
        return CodeDataset(path)
    except FileNotFoundError as err:
        raise CLIError(
            f"{err}. Make a code dataset first, e.g. `codegpt fit-codebook --digits --out codes` "
            "(then --data codes/data), or write one with codegpt.data.write_code_dataset"
        ) from None


def _split(dataset: CodeDataset, val_fraction: float, seed: int) -> tuple[Any, Any]:
    if val_fraction == 0:
        return dataset, None
    with _user_errors("--val-fraction: "):
        return dataset.split(val_fraction, seed=seed)


def _decoder(codebook_dir: str | None, patch: int | None) -> Any:
    """codes -> pixels through a saved patch codebook, or None (one colour per code)."""
    if codebook_dir is None:
        return None
    with _user_errors("--codebook: "):
        return patch_decoder(Codebook.from_pretrained(codebook_dir), patch)


def _load_model(path: str, device: str) -> Any:
    with _user_errors():
        return load_model(path, device=device, what="model")


# ---------------------------------------------------------------------------------------------
# The commands
# ---------------------------------------------------------------------------------------------


def _run_demo(args: argparse.Namespace) -> int:
    # samples.png shows at most the samples drawn per class.
    settings = _from_args(DemoSettings, args, grid_columns=min(args.grid_columns, args.samples_per_class))
    _print(format_report(run_demo(settings)))
    return 0


def _run_fit_codebook(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.digits:
        with _user_errors():
            fitted = digits_code_dataset(out, args.num_codes, args.patch, args.seed, args.val_fraction)
        scale = " (0-16 scale)"
    else:
        try:
            tensors = load_file(args.latents)
        except (FileNotFoundError, SafetensorError, OSError) as err:
            raise CLIError(f"--latents {args.latents}: cannot read it as safetensors ({err})") from None
        if "latents" not in tensors:
            raise CLIError(
                f"--latents {args.latents} must hold a tensor 'latents' (N, H, W, D); it holds {sorted(tensors)}"
            )
        with _user_errors("--latents: "):
            fitted = fit_code_dataset(
                out,
                tensors["latents"],
                tensors.get("labels"),
                num_codes=args.num_codes,
                val_fraction=args.val_fraction,
                seed=args.seed,
                metric=args.metric,
                class_names=args.class_names.split(",") if args.class_names else None,
                description=f"codes of {args.latents}, {args.num_codes}-code k-means (seed {args.seed})",
                codebook_description=f"k-means over {args.latents}",
            )
        scale = ""
    m, dataset = fitted.metrics, fitted.dataset
    mse = f"held-out MSE {m['mse_held_out']:.4g}" if "mse_held_out" in m else f"MSE {m['mse']:.4g}"
    _print(
        f"codebook: {args.num_codes} codes, {mse}{scale}, perplexity {m['perplexity']:.1f}, "
        f"dead codes {m['dead_codes']} -> {out / 'codebook'}"
    )
    _print(f"codes: {len(dataset)} items of {dataset.grid[0]}x{dataset.grid[1]} codes -> {out / 'data'}")
    _print(
        f"next: codegpt train --data {out / 'data'} --out run --codebook {out / 'codebook'} "
        f"--val-fraction {args.val_fraction} --split-seed {args.seed}"
    )
    return 0


def _model_config(inputs: TrainInputs, dataset: CodeDataset) -> GPTConfig:
    num_classes = 0 if inputs.unconditional else dataset.num_classes
    if inputs.config:
        path = Path(inputs.config)
        try:
            config = GPTConfig.from_pretrained(path) if path.is_dir() else GPTConfig.from_json_file(str(path))
        except (OSError, ValueError) as err:
            raise CLIError(f"--config {path}: {err}") from None
    else:
        with _user_errors("model flags: "):
            config = config_for(
                dataset,
                dropout=inputs.dropout,
                class_conditional=False if inputs.unconditional else None,
                embed_dim=inputs.embed_dim,
                num_layers=inputs.num_layers,
                num_heads=inputs.num_heads,
                class_dropout_prob=inputs.class_dropout,
            )
    with _user_errors():
        check_compatible(config, dataset.codebook_size, dataset.grid, num_classes, where=f"the dataset {inputs.data}")
    return config


def _run_train(args: argparse.Namespace) -> int:
    inputs = _from_args(TrainInputs, args)
    targs = _from_args(
        TrainingArguments,
        args,
        warmup_steps=min(args.warmup_steps, args.max_steps),
        max_grad_norm=args.max_grad_norm or None,  # 0 on the command line: no clipping
    )
    dataset = _open_dataset(inputs.data)
    config = _model_config(inputs, dataset)
    train_part, val_part = _split(dataset, inputs.val_fraction, inputs.split_seed)
    decode = _decoder(inputs.codebook, inputs.patch)
    # A ValueError is raised before the first step (output folder, batch size vs dataset size).
    with _user_errors(kinds=(ValueError,)):
        result = train(targs, config, train_part, val_part, decode=decode, grid_shape=dataset.grid)
    if result.final_eval is not None:
        final = result.final_eval
        _print(f"held-out: {final['bits_per_code']:.4f} bits per code ({final['loss_nats']:.4f} nats)")
    _print(f"model: {result.model_dir}")
    if result.samples_png is not None:
        _print(f"samples: {result.samples_png}")
    return 0


def _run_sample(args: argparse.Namespace) -> int:
    model = _load_model(args.model, args.device)
    config = model.config
    with _user_errors("--grid: "):
        grid = _check_grid(args.grid, config.seq_len)
    decode = _decoder(args.codebook, args.patch)
    per_class = args.per_class if config.class_conditional else args.num_samples
    with _user_errors():
        codes, classes = sample_classes(
            model,
            per_class,
            args.classes,
            guidance_scale=args.guidance_scale,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
        )
    rows = 1 if classes is None else len(classes) // per_class
    png = save_image_grid(render_codes(codes, grid, decode, config.codebook_size), args.out, rows=rows)
    _print(f"samples: {png} ({codes.shape[0]} images, {rows} row{'s' if rows > 1 else ''})")
    if args.codes_out:
        tensors = {"codes": codes.reshape(-1, *grid).contiguous()}
        if classes is not None:
            tensors["classes"] = classes.contiguous()
        _print(f"codes: {save_safetensors(args.codes_out, tensors)}")
    return 0


def _check_grid(grid: tuple[int, int] | None, seq_len: int) -> tuple[int, int]:
    if grid is None:
        side = math.isqrt(seq_len)
        grid = (side, side) if side * side == seq_len else (1, seq_len)
    if grid[0] * grid[1] != seq_len:
        raise ValueError(f"{grid[0]}x{grid[1]} holds {grid[0] * grid[1]} codes but the model's seq_len is {seq_len}")
    return grid


def _run_eval(args: argparse.Namespace) -> int:
    model = _load_model(args.model, args.device)
    dataset = _open_dataset(args.data)
    num_classes = dataset.num_classes if model.config.class_conditional else 0
    with _user_errors():
        check_compatible(
            model.config, dataset.codebook_size, dataset.grid, num_classes, where=f"the dataset {args.data}"
        )
    if args.val_fraction == 0:
        raise CLIError("--val-fraction must be > 0: the figures are measured on the held-out split")
    train_part, val_part = _split(dataset, args.val_fraction, args.split_seed)
    to_pixels = judge = None
    if args.digits:
        if args.codebook is None:
            raise CLIError("--digits needs --codebook (the folder `codegpt fit-codebook --digits` wrote)")
        images, labels = load_digits_images()
        if len(dataset) != len(labels) or not model.config.class_conditional:
            raise CLIError(
                f"--digits expects the {len(labels)} digits with a class-conditional model; got {len(dataset)} "
                "items" + ("" if model.config.class_conditional else " and an unconditional model")
            )
        with _user_errors("--codebook: "):
            codebook = Codebook.from_pretrained(args.codebook)
        judge = fit_digit_judge(images[train_part.indices], labels[train_part.indices], seed=args.seed)

        def to_pixels(codes):
            return codes_to_images(codebook, codes, patch=args.patch)

    with _user_errors(kinds=(ValueError,)):
        metrics, _ = evaluate_prior(
            model,
            train_part,
            val_part,
            samples_per_class=args.samples_per_class,
            guidance_scale=args.guidance_scale,
            seed=args.seed,
            to_pixels=to_pixels,
            judge=judge,
        )
    if args.digits:
        val_idx = val_part.indices
        metrics.update(digit_judge_accuracy(judge, codebook, images[val_idx], labels[val_idx], patch=args.patch))
    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        _print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    if args.out:
        write_json(args.out, {"eval": metrics})
        _print(f"metrics: {args.out}")
    return 0


def _run_push(args: argparse.Namespace) -> int:
    with _user_errors():
        common = {
            "info": _from_args(CardInfo, args),
            # Flags given replace single settings of the run's own (see --help).
            "sampling": {
                k: getattr(args, k)
                for k in ("temperature", "top_k", "top_p", "guidance_scale")
                if getattr(args, k) is not None
            },
            "metrics": read_json(args.metrics, "--metrics") if args.metrics else None,
            "training_args": read_json(args.training_args, "--training-args") if args.training_args else None,
            "codebook_dir": args.codebook,
            "data_dir": args.data,
            "eval_sampling": args.eval_sampling,
            "template_path": args.template,
        }
        if args.dry_run:
            out = prepare_upload_folder(
                args.model_dir, args.dry_run, repo_id=args.repo_id, overwrite=args.overwrite, **common
            )
            _print(f"dry run: wrote the upload folder for {args.repo_id} to {out}")
            for name in upload_file_names(args.codebook is not None):
                _print(f"  {name}")
            return 0
        try:
            sha = push_to_hub(
                args.model_dir,
                args.repo_id,
                private=args.private or None,
                commit_message=args.commit_message,
                pin_revision=not args.no_pin,
                **common,
            )
        except (OfflineModeIsEnabled, HfHubHTTPError) as err:  # offline, no or a wrong token, no rights
            print(f"codegpt push: upload failed: {err}", file=sys.stderr)
            return 1
    _print(f"pushed {args.repo_id} at revision {sha}")
    _print(
        f'load it with AutoModelForCausalLM.from_pretrained("{args.repo_id}", revision="{sha}", trust_remote_code=True)'
    )
    return 0


# ---------------------------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------------------------


def _add_demo(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        formatter_class=_HelpFormatter,
        dataclass_types=[DemoSettings],
        help="the embedded default: digits -> codebook -> prior -> samples, judged (no download)",
        description=(
            "Fit a 128-code k-means codebook on 2x2 patches of scikit-learn's digits, train a "
            "class-conditional prior, sample every class with and without guidance, decode to pixels and "
            "judge the samples. Writes OUT/samples.png (one row per class) and OUT/metrics.json. "
            "Needs scikit-learn (pip install 'codegpt[demo]')."
        ),
    )
    p.set_defaults(func=_run_demo)


def _add_fit_codebook(sub: Any) -> None:
    p = sub.add_parser(
        "fit-codebook",
        formatter_class=_HelpFormatter,
        help="fit a k-means codebook and write the codes as a dataset",
        description=(
            "Fit a post-hoc k-means codebook on the training split's vectors and encode every item. Writes "
            "OUT/codebook (a saved Codebook) and OUT/data (a code dataset for `codegpt train`). The vectors are "
            "the digits' pixel patches (--digits) or your autoencoder's latents (--latents FILE: a "
            "safetensors file with a float tensor 'latents' (N, H, W, D) and optionally an int tensor 'labels' "
            "(N,))."
        ),
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--digits", action="store_true", help="scikit-learn's 8x8 digits, pixel patches")
    source.add_argument("--latents", metavar="FILE", help="safetensors file with 'latents' (and 'labels')")
    p.add_argument("--out", required=True, help="output folder (codebook/ and data/ go inside)")
    p.add_argument("--num-codes", type=int, default=128, help="codebook size K")
    p.add_argument("--patch", type=int, default=2, help="--digits: patch side")
    p.add_argument("--seed", type=int, default=0, help="seeds k-means and the split")
    p.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                   help="held out of the codebook fit (use the same value and seed for train and eval)")
    p.add_argument("--metric", choices=["euclidean", "cosine"], default="euclidean")
    p.add_argument("--class-names", help="comma-separated class names, in class-id order")
    p.set_defaults(func=_run_fit_codebook)


def _add_train(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        formatter_class=_HelpFormatter,
        dataclass_types=[TrainInputs, TrainingArguments],
        help="train a prior on a code dataset (run it under `accelerate launch -m codegpt train`)",
        description=(
            "Train a GPT prior on a code dataset. One process: `codegpt train ...`; several GPUs: `accelerate "
            "launch --multi_gpu --num_processes N -m codegpt train ...`; two CPU processes: `accelerate launch "
            "--config_file examples/accelerate_cpu2.yaml -m codegpt train ...`. The model's vocabulary, "
            "sequence length and classes come from the dataset; --config gives a full GPTConfig instead "
            "(JSON file or model folder), checked against the dataset. Writes OUT/model (save_pretrained), "
            "OUT/checkpoints, OUT/log.jsonl and OUT/samples.png."
        ),
    )
    p.set_defaults(func=_run_train)


def _add_sample(sub: Any) -> None:
    p = sub.add_parser(
        "sample",
        formatter_class=_HelpFormatter,
        help="sample code grids from a trained prior and draw them",
        description=(
            "Sample whole images of codes. A class-conditional model draws --per-class samples of every class "
            "(one row each) or of --classes; an unconditional one draws --num-samples. Writes a PNG (pixels "
            "through --codebook, else one coloured cell per code) and optionally the codes as safetensors."
        ),
    )
    p.add_argument("model", help="model folder (save_pretrained) or training run folder")
    p.add_argument("--out", default="samples.png", help="PNG to write")
    p.add_argument("--codes-out", help="also write the codes (N, H, W) and classes to this safetensors file")
    p.add_argument("--classes", type=_int_list, help="comma-separated class ids (default: every class)")
    p.add_argument("--per-class", type=int, default=8, help="samples per class (one row per class)")
    p.add_argument("--num-samples", type=int, default=16, help="unconditional model: how many")
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (1 or unset: off)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None, help="keep the k likeliest codes")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same samples")
    p.add_argument("--grid", type=_grid_arg, help="code grid HxW (default: square seq_len)")
    p.add_argument("--codebook", help="saved patch codebook, to draw pixels")
    p.add_argument("--patch", type=int, help="patch side of --codebook's vectors (default: sqrt(dim))")
    p.add_argument("--device", default="auto", help="where to sample: auto (the accelerator if any), cpu, cuda:0, ...")
    p.set_defaults(func=_run_sample)


def _add_eval(sub: Any) -> None:
    p = sub.add_parser(
        "eval",
        formatter_class=_HelpFormatter,
        help="held-out bits per code vs a baseline, novelty, class consistency",
        description=(
            "Measure a prior on the held-out split of a code dataset (the same --val-fraction and --split-seed "
            "as training): bits per code against the class-conditional independent-per-position baseline, "
            "novelty of samples (not copies of a training grid), and, with --digits, class consistency judged "
            "by an SVC trained on the real training digits."
        ),
    )
    p.add_argument("model", help="model folder (save_pretrained) or training run folder")
    p.add_argument("--data", required=True, help="code dataset folder the model was trained on")
    p.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION, help="held-out share, as in training")
    p.add_argument("--split-seed", type=int, default=0, help="as in training")
    p.add_argument("--samples-per-class", type=int, default=100,
                   help="samples per class (unconditional model: samples in all)")
    p.add_argument("--guidance-scale", type=float, default=2.0, help="for the guided samples")
    p.add_argument("--seed", type=int, default=0, help="seeds the samples and the judge")
    p.add_argument("--digits", action="store_true", help="the data is the digits set: judge class consistency")
    p.add_argument("--codebook", help="the digits' patch codebook (needed with --digits)")
    p.add_argument("--patch", type=int, default=2, help="patch side of --codebook's vectors")
    p.add_argument("--out", help="write the metrics to this JSON file")
    p.add_argument("--device", default="auto", help="where to run: auto (the accelerator if any), cpu, cuda:0, ...")
    p.set_defaults(func=_run_eval)


def _add_push(sub: Any) -> None:
    p = sub.add_parser(
        "push",
        formatter_class=_HelpFormatter,
        dataclass_types=[CardInfo],
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
    p.add_argument("--metrics", metavar="JSON", help="a JSON object or a .jsonl log (default: the run's evaluation)")
    p.add_argument("--training-args", metavar="JSON", help="training settings (default: the run's training_args.json)")
    p.add_argument("--codebook", metavar="DIR", help="a saved codebook folder, shipped in codebook/")
    p.add_argument("--data", metavar="DIR", help="the code dataset trained on (its grid, class names and description)")
    p.add_argument("--template", help="a model card template instead of codegpt's model_card.md")
    g = p.add_argument_group("recommended sampling settings (saved in generation_config.json)")
    g.add_argument("--temperature", type=float, help="0 is greedy (default: the run's sample temperature, or 1)")
    g.add_argument("--top-k", type=int, help="keep the k most likely codes (default: off)")
    g.add_argument("--top-p", type=float, help="nucleus sampling mass (default: off)")
    g.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default: the run's sample guidance)")
    g.add_argument("--eval-sampling", help="the settings behind sample-based metrics on the card, as text")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--commit-message", help="message of the upload commit")
    p.add_argument("--no-pin", action="store_true", help="do not pin the card's snippets to the upload commit")
    p.set_defaults(func=_run_push)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="codegpt",
        description=(
            "GPT-style autoregressive priors over discrete image codes. Start with `codegpt demo` (digits, "
            "no download, a few minutes on a laptop CPU)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"codegpt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_ArgumentParser)
    for add in (_add_demo, _add_fit_codebook, _add_train, _add_sample, _add_eval, _add_push):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``codegpt`` console script and ``python -m codegpt``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CLIError as err:
        if _is_main_process():
            print(f"codegpt {args.command}: error: {err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
