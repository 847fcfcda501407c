"""The ``codegpt`` command: demo, fit-codebook, train, sample, eval, push.

Each command is a thin layer over a library function (``codegpt.demo.run_demo``,
``codegpt.training.train``, ``codegpt.sampling.generate``, ``codegpt.evaluation.evaluate_prior``,
``codegpt.hub``). ``train`` runs under ``accelerate launch -m codegpt train ...`` for several
processes or GPUs, and as a plain ``codegpt train ...`` on one.

Errors a user can fix (a missing dataset folder, a model config that does not fit the codes) are
printed as one line saying what to do, with exit status 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser", "CLIError"]

DEFAULT_VAL_FRACTION = 0.2


class CLIError(Exception):
    """An error the user can fix; printed without a traceback."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, but not the uninformative ones (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or action.help is None:
            return action.help or ""
        return super()._get_help_string(action)


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def _is_main_process() -> bool:
    # Under `accelerate launch` every process runs main(); only one should print errors.
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an int >= 0, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated ints such as 0,3,7, got {text!r}") from None


def _open_dataset(path: str | os.PathLike):
    from .data import CodeDataset

    try:
        return CodeDataset(path)
    except FileNotFoundError as err:
        raise CLIError(
            f"{err}. Make a code dataset first, e.g. `codegpt fit-codebook --digits --out codes` "
            "(then --data codes/data), or write one with codegpt.data.write_code_dataset"
        ) from None


def _split(dataset, val_fraction: float, seed: int):
    if val_fraction == 0:
        return dataset, None
    try:
        return dataset.split(val_fraction, seed=seed)
    except ValueError as err:
        raise CLIError(f"--val-fraction: {err}") from None


def _model_dir(path: str | os.PathLike) -> Path:
    """A save_pretrained folder: the path itself, or a run folder's model/ (or newest checkpoint)."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if (path / "model" / "config.json").is_file():
        return path / "model"
    from .training import find_resume_checkpoint

    checkpoint = find_resume_checkpoint(path)
    if checkpoint is not None:
        return checkpoint / "model"
    raise CLIError(
        f"{path} is not a model folder: no config.json in it or in {path / 'model'} (pass a training run "
        "folder, its model/ folder, or any save_pretrained folder)"
    )


def _load_model(path: str | os.PathLike, device: str = "auto"):
    import torch

    from .modeling_codegpt import GPT

    if device == "auto":
        found = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
        device = str(found) if found is not None else "cpu"
    try:
        target = torch.device(device)
    except RuntimeError as err:
        raise CLIError(f"--device {device!r}: {err}") from None
    return GPT.from_pretrained(_model_dir(path)).to(target).eval()


def _decoder(codebook_dir: str | None, patch: int | None) -> Callable | None:
    """codes (B, H, W) -> images in [0, 1] through a saved patch codebook, or None (code colours)."""
    if codebook_dir is None:
        return None
    import torch

    from .codebook import Codebook
    from .digits import unpatchify

    try:
        codebook = Codebook.from_pretrained(codebook_dir)
    except (FileNotFoundError, OSError, ValueError) as err:
        raise CLIError(f"--codebook: {err}") from None
    if patch is None:
        side = math.isqrt(codebook.dim)
        if side * side != codebook.dim:
            raise CLIError(
                f"--codebook vectors have dim {codebook.dim}, not a square patch; pass --patch, or leave out "
                "--codebook to draw each code as a coloured cell"
            )
        patch = side
    if patch * patch != codebook.dim:
        raise CLIError(f"--patch {patch} needs codebook vectors of dim {patch * patch}, got {codebook.dim}")
    low, high = float(codebook.centroids.min()), float(codebook.centroids.max())

    def decode(codes: torch.Tensor) -> torch.Tensor:
        images = unpatchify(codebook.decode(codes.cpu()), patch)
        return ((images - low) / max(high - low, 1e-12)).clamp(0, 1)

    return decode


def _print(*args: Any) -> None:
    if _is_main_process():
        print(*args, flush=True)


# ---------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------


def _add_demo(sub) -> None:
    from .demo import DemoSettings

    d = DemoSettings()
    p = sub.add_parser(
        "demo",
        help="the embedded default: digits -> codebook -> prior -> samples, judged (no download)",
        description=(
            "Fit a 128-code k-means codebook on 2x2 patches of scikit-learn's digits, train a "
            "class-conditional prior, sample every class with and without guidance, decode to pixels and "
            "judge the samples. Writes OUT/samples.png (one row per class) and OUT/metrics.json. "
            "Needs scikit-learn (pip install 'codegpt[demo]')."
        ),
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--out", default=str(d.out_dir), help="output folder (re-running overwrites it)")
    p.add_argument("--seed", type=_non_negative_int, default=d.seed,
                   help="seeds the codebook, split, prior and samples")
    p.add_argument("--steps", type=_positive_int, default=d.steps, help="optimizer steps")
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size, help="sequences per step")
    p.add_argument("--lr", type=float, default=d.learning_rate, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="on matrices only")
    p.add_argument("--embed-dim", type=_positive_int, default=d.embed_dim, help="prior width")
    p.add_argument("--layers", type=_positive_int, default=d.num_layers, help="prior depth")
    p.add_argument("--heads", type=_positive_int, default=d.num_heads, help="attention heads")
    p.add_argument("--dropout", type=_fraction, default=d.dropout, help="embedding and residual dropout")
    p.add_argument("--class-dropout", type=_fraction, default=d.class_dropout,
                   help="probability of training on the null class (for guidance)")
    p.add_argument("--num-codes", type=_positive_int, default=d.num_codes, help="codebook size")
    p.add_argument("--samples-per-class", type=_positive_int, default=d.samples_per_class,
                   help="samples per class for the consistency and novelty figures")
    p.add_argument("--guidance-scale", type=float, default=d.guidance_scale,
                   help="classifier-free guidance of the guided samples")
    p.add_argument("--grid-columns", type=_positive_int, default=d.grid_columns,
                   help="samples per row (class) in samples.png")
    p.add_argument("--mixed-precision", "--mixed_precision", choices=["no", "bf16", "fp16"], default="no",
                   help="autocast for training ('no' is fp32)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import DemoSettings, format_report, run_demo

    try:
        settings = DemoSettings(
            out_dir=args.out,
            seed=args.seed,
            num_codes=args.num_codes,
            embed_dim=args.embed_dim,
            num_layers=args.layers,
            num_heads=args.heads,
            dropout=args.dropout,
            class_dropout=args.class_dropout,
            steps=args.steps,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            weight_decay=args.weight_decay,
            mixed_precision=args.mixed_precision,
            samples_per_class=args.samples_per_class,
            guidance_scale=args.guidance_scale,
            grid_columns=min(args.grid_columns, args.samples_per_class),
            progress=not args.no_progress,
        )
    except ValueError as err:
        raise CLIError(str(err)) from None
    report = run_demo(settings)
    _print(format_report(report))
    return 0


# ---------------------------------------------------------------------------------------------
# fit-codebook
# ---------------------------------------------------------------------------------------------


def _add_fit_codebook(sub) -> None:
    p = sub.add_parser(
        "fit-codebook",
        help="fit a k-means codebook and write the codes as a dataset",
        description=(
            "Fit a post-hoc k-means codebook on the training split's vectors and encode every item. Writes "
            "OUT/codebook (a saved Codebook) and OUT/data (a code dataset for `codegpt train`). The vectors are "
            "the digits' 2x2 pixel patches (--digits) or your autoencoder's latents (--latents FILE: a "
            "safetensors file with a float tensor 'latents' (N, H, W, D) and optionally an int tensor 'labels' "
            "(N,))."
        ),
        formatter_class=_HelpFormatter,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--digits", action="store_true", help="scikit-learn's 8x8 digits, 2x2 patches")
    source.add_argument("--latents", metavar="FILE", help="safetensors file with 'latents' (and 'labels')")
    p.add_argument("--out", required=True, help="output folder (codebook/ and data/ go inside)")
    p.add_argument("--num-codes", type=_positive_int, default=128, help="codebook size K")
    p.add_argument("--patch", type=_positive_int, default=2, help="--digits: patch side")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="seeds k-means and the split")
    p.add_argument("--val-fraction", type=_fraction, default=DEFAULT_VAL_FRACTION,
                   help="held out of the codebook fit (use the same value and seed for train and eval)")
    p.add_argument("--metric", choices=["euclidean", "cosine"], default="euclidean")
    p.add_argument("--class-names", help="comma-separated class names, in class-id order")
    p.set_defaults(func=_run_fit_codebook)


def _run_fit_codebook(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.digits:
        from .demo import prepare_digits

        if args.val_fraction == 0:
            raise CLIError("--digits needs --val-fraction > 0: the codebook is fitted on the training split only")
        try:
            digits = prepare_digits(out, args.num_codes, args.patch, args.seed, args.val_fraction)
        except ImportError as err:
            raise CLIError(str(err)) from None
        metrics, dataset = digits["codebook_metrics"], digits["dataset"]
        mse = metrics.get("mse_held_out", metrics["mse"])
        _print(
            f"codebook: {args.num_codes} codes, held-out MSE {mse:.3f} (0-16 scale), perplexity "
            f"{metrics['perplexity']:.1f}, dead codes {metrics['dead_codes']} -> {out / 'codebook'}"
        )
    else:
        dataset = _fit_latents(args, out)
    _print(f"codes: {len(dataset)} items of {dataset.grid[0]}x{dataset.grid[1]} codes -> {out / 'data'}")
    _print(
        f"next: codegpt train --data {out / 'data'} --out run --codebook {out / 'codebook'}"
        + (f" --val-fraction {args.val_fraction} --split-seed {args.seed}" if not args.digits else "")
    )
    return 0


def _fit_latents(args: argparse.Namespace, out: Path):
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .codebook import Codebook
    from .data import CodeDataset, write_code_dataset
    from .evaluation import split_indices

    try:
        tensors = load_file(args.latents)
    except (FileNotFoundError, SafetensorError, OSError) as err:
        raise CLIError(f"--latents {args.latents}: cannot read it as safetensors ({err})") from None
    latents = tensors.get("latents")
    if latents is None or latents.dim() != 4 or not latents.is_floating_point():
        raise CLIError(
            f"--latents {args.latents} must hold a float tensor 'latents' of shape (N, H, W, D), got "
            f"{None if latents is None else (tuple(latents.shape), latents.dtype)} (tensors: {sorted(tensors)})"
        )
    labels = tensors.get("labels")
    num_classes = 0
    if labels is not None:
        if labels.shape != latents.shape[:1] or labels.is_floating_point():
            raise CLIError(
                f"--latents: 'labels' must be ints of shape ({latents.shape[0]},), got {tuple(labels.shape)}"
            )
        num_classes = int(labels.max()) + 1
    class_names = args.class_names.split(",") if args.class_names else None
    fit_on = latents
    if args.val_fraction > 0:
        train_idx, _ = split_indices(latents.shape[0], args.val_fraction, args.seed)
        fit_on = latents[torch.tensor(train_idx)]
    try:
        codebook = Codebook.fit(fit_on, args.num_codes, metric=args.metric, seed=args.seed,
                                description=f"k-means over {args.latents}")
        codes = codebook.encode(latents)
        write_code_dataset(out / "data", codes, labels, codebook_size=args.num_codes, num_classes=num_classes,
                           class_names=class_names, overwrite=True,
                           description=f"codes of {args.latents}, {args.num_codes}-code k-means (seed {args.seed})")
    except (TypeError, ValueError) as err:
        raise CLIError(str(err)) from None
    codebook.save_pretrained(out / "codebook")
    stats = codebook.stats(latents)
    _print(
        f"codebook: {args.num_codes} codes, MSE {stats.mse:.4g}, perplexity {stats.perplexity:.1f}, dead codes "
        f"{stats.dead_codes} -> {out / 'codebook'}"
    )
    return CodeDataset(out / "data")


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------


def _add_train(sub) -> None:
    from .training import TrainingArguments

    d = TrainingArguments(output_dir=".")
    p = sub.add_parser(
        "train",
        help="train a prior on a code dataset (run it under `accelerate launch -m codegpt train`)",
        description=(
            "Train a GPT prior on a code dataset. One process: `codegpt train ...`; several GPUs: `accelerate "
            "launch --multi_gpu --num_processes N -m codegpt train ...`; two CPU processes: `accelerate launch "
            "--config_file examples/accelerate_cpu2.yaml -m codegpt train ...`. The model's vocabulary, "
            "sequence length and classes come from the dataset; --config gives a full GPTConfig instead "
            "(JSON file or model folder), checked against the dataset. Writes OUT/model (save_pretrained), "
            "OUT/checkpoints, OUT/log.jsonl and OUT/samples.png."
        ),
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--data", required=True, help="code dataset folder (see `codegpt fit-codebook`)")
    p.add_argument("--out", required=True, help="run folder")
    g = p.add_argument_group("model")
    g.add_argument("--config", help="GPTConfig JSON file or model folder (overrides the flags below)")
    g.add_argument("--embed-dim", type=_positive_int, default=256, help="width")
    g.add_argument("--layers", type=_positive_int, default=8, help="depth")
    g.add_argument("--heads", type=_positive_int, default=8, help="attention heads")
    g.add_argument("--dropout", type=_fraction, default=0.1, help="embedding and residual dropout")
    g.add_argument("--class-dropout", type=_fraction, default=0.1,
                   help="probability of training on the null class (for guidance)")
    g.add_argument("--unconditional", action="store_true", help="ignore the dataset's classes")
    g = p.add_argument_group("data")
    g.add_argument("--val-fraction", type=_fraction, default=DEFAULT_VAL_FRACTION,
                   help="held out for evaluation (0: no evaluation)")
    g.add_argument("--split-seed", type=_non_negative_int, default=0, help="seeds the train/val split")
    g.add_argument("--num-workers", type=_non_negative_int, default=d.num_workers, help="DataLoader workers")
    g = p.add_argument_group("optimization")
    g.add_argument("--steps", type=_positive_int, default=d.max_steps, help="optimizer steps")
    g.add_argument("--batch-size", type=_positive_int, default=d.per_device_batch_size, help="per process")
    g.add_argument("--grad-accum", type=_positive_int, default=d.gradient_accumulation_steps,
                   help="gradient accumulation steps")
    g.add_argument("--lr", type=float, default=d.learning_rate, help="peak learning rate")
    g.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="final lr / peak lr (cosine)")
    g.add_argument("--warmup-steps", type=_non_negative_int, default=d.warmup_steps, help="linear warmup")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="on matrices only")
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="clipping; 0 turns it off")
    g.add_argument("--mixed-precision", "--mixed_precision", choices=["no", "bf16", "fp16"], default=None,
                   help="default: as `accelerate launch` is configured, else fp32")
    g.add_argument("--seed", type=_non_negative_int, default=d.seed, help="seeds the weights, data order, dropout")
    g = p.add_argument_group("evaluation, samples and checkpoints")
    g.add_argument("--eval-every", type=_non_negative_int, default=d.eval_every, help="steps; 0: at the end only")
    g.add_argument("--save-every", type=_non_negative_int, default=500, help="steps; 0: no checkpoints")
    g.add_argument("--save-total-limit", type=_positive_int, default=d.save_total_limit, help="checkpoints kept")
    g.add_argument("--sample-every", type=_non_negative_int, default=d.sample_every, help="steps; 0: at the end")
    g.add_argument("--samples-per-class", type=_positive_int, default=d.samples_per_class,
                   help="columns of the sample grids")
    g.add_argument("--guidance-scale", type=float, default=None, help="for the sample grids")
    g.add_argument("--codebook", help="saved patch codebook, to draw samples as pixels")
    g.add_argument("--patch", type=_positive_int, help="patch side of --codebook's vectors (default: sqrt(dim))")
    g.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    g.add_argument("--overwrite-output-dir", "--overwrite_output_dir", action="store_true",
                   help="delete --out's checkpoints and start over")
    g.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_train)


def _model_config(args: argparse.Namespace, dataset):
    from .configuration_codegpt import GPTConfig
    from .training import check_compatible

    num_classes = 0 if args.unconditional else dataset.num_classes
    if args.config:
        path = Path(args.config)
        try:
            config = GPTConfig.from_pretrained(path) if path.is_dir() else GPTConfig.from_json_file(str(path))
        except (OSError, ValueError) as err:
            raise CLIError(f"--config {path}: {err}") from None
    else:
        try:
            config = GPTConfig(
                vocab_size=dataset.vocab_size,
                seq_len=dataset.seq_len,
                embed_dim=args.embed_dim,
                num_layers=args.layers,
                num_heads=args.heads,
                embd_dropout=args.dropout,
                resid_dropout=args.dropout,
                class_conditional=num_classes > 0,
                num_classes=num_classes,
                class_dropout_prob=args.class_dropout,
            )
        except ValueError as err:
            raise CLIError(f"model flags: {err}") from None
    try:
        check_compatible(config, dataset.codebook_size, dataset.grid, num_classes, where=f"the dataset {args.data}")
    except ValueError as err:
        raise CLIError(str(err)) from None
    return config


def _run_train(args: argparse.Namespace) -> int:
    from .training import TrainingArguments, train

    dataset = _open_dataset(args.data)
    config = _model_config(args, dataset)
    train_part, val_part = _split(dataset, args.val_fraction, args.split_seed)
    try:
        targs = TrainingArguments(
            output_dir=args.out,
            max_steps=args.steps,
            per_device_batch_size=args.batch_size,
            gradient_accumulation_steps=args.grad_accum,
            learning_rate=args.lr,
            min_lr_ratio=args.min_lr_ratio,
            warmup_steps=min(args.warmup_steps, args.steps),
            weight_decay=args.weight_decay,
            max_grad_norm=args.max_grad_norm or None,
            mixed_precision=args.mixed_precision,
            seed=args.seed,
            eval_every=args.eval_every,
            save_every=args.save_every,
            save_total_limit=args.save_total_limit,
            sample_every=args.sample_every,
            samples_per_class=args.samples_per_class,
            sample_guidance_scale=args.guidance_scale,
            resume=args.resume,
            overwrite_output_dir=args.overwrite_output_dir,
            progress=not args.no_progress,
            num_workers=args.num_workers,
        )
    except ValueError as err:
        raise CLIError(str(err)) from None
    decode = _decoder(args.codebook, args.patch)
    try:
        result = train(targs, config, train_part, val_part, decode=decode, grid_shape=dataset.grid)
    except ValueError as err:
        # Raised before the first step (arguments, output folder, batch size vs dataset size).
        raise CLIError(str(err)) from None
    final = result.final_eval
    if final is not None:
        _print(f"held-out: {final['bits_per_code']:.4f} bits per code ({final['loss_nats']:.4f} nats)")
    _print(f"model: {result.model_dir}")
    if result.samples_png is not None:
        _print(f"samples: {result.samples_png}")
    return 0


# ---------------------------------------------------------------------------------------------
# sample
# ---------------------------------------------------------------------------------------------


def _add_sample(sub) -> None:
    p = sub.add_parser(
        "sample",
        help="sample code grids from a trained prior and draw them",
        description=(
            "Sample whole images of codes. A class-conditional model draws --per-class samples of every class "
            "(one row each) or of --classes; an unconditional one draws --num-samples. Writes a PNG (pixels "
            "through --codebook, else one coloured cell per code) and optionally the codes as safetensors."
        ),
        formatter_class=_HelpFormatter,
    )
    p.add_argument("model", help="model folder (save_pretrained) or training run folder")
    p.add_argument("--out", default="samples.png", help="PNG to write")
    p.add_argument("--codes-out", help="also write the codes (N, H, W) and classes to this safetensors file")
    p.add_argument("--classes", type=_int_list, help="comma-separated class ids (default: every class)")
    p.add_argument("--per-class", type=_positive_int, default=8, help="samples per class (one row per class)")
    p.add_argument("--num-samples", type=_positive_int, default=16, help="unconditional model: how many")
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (1 or unset: off)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--top-k", type=_non_negative_int, default=None, help="keep the k likeliest codes")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="the same seed gives the same samples")
    p.add_argument("--grid", help="code grid HxW (default: square seq_len)")
    p.add_argument("--codebook", help="saved patch codebook, to draw pixels")
    p.add_argument("--patch", type=_positive_int, help="patch side of --codebook's vectors (default: sqrt(dim))")
    p.add_argument("--device", default="auto", help="where to sample: auto (the accelerator if any), cpu, cuda:0, ...")
    p.set_defaults(func=_run_sample)


def _grid_shape(text: str | None, seq_len: int) -> tuple[int, int]:
    if text:
        try:
            H, W = (int(v) for v in text.lower().split("x"))
        except ValueError:
            raise CLIError(f"--grid must look like 4x4, got {text!r}") from None
    else:
        side = math.isqrt(seq_len)
        H, W = (side, side) if side * side == seq_len else (1, seq_len)
    if H * W != seq_len:
        raise CLIError(f"--grid {H}x{W} holds {H * W} codes but the model's seq_len is {seq_len}")
    return H, W


def _run_sample(args: argparse.Namespace) -> int:
    import torch

    from .sampling import generate
    from .training import render_codes, save_image_grid

    model = _load_model(args.model, args.device)
    config = model.config
    grid = _grid_shape(args.grid, config.seq_len)
    decode = _decoder(args.codebook, args.patch)
    if config.class_conditional:
        wanted = args.classes if args.classes is not None else list(range(config.num_classes))
        bad = [c for c in wanted if not 0 <= c < config.num_classes]
        if bad or not wanted:
            raise CLIError(f"--classes must be ids in [0, {config.num_classes}), got {args.classes}")
        classes = torch.tensor(wanted).repeat_interleave(args.per_class).to(model.device)
        rows = len(wanted)
    else:
        if args.classes is not None:
            raise CLIError("--classes was given but the model is unconditional")
        classes, rows = None, 1
    try:
        tokens = generate(
            model,
            classes=classes,
            num_samples=None if classes is not None else args.num_samples,
            guidance_scale=args.guidance_scale,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            generator=args.seed,  # a generator on the model's device, seeded
        )
    except (TypeError, ValueError) as err:
        raise CLIError(str(err)) from None
    codes = tokens[:, 1:].cpu()
    images = render_codes(codes, grid, decode, config.codebook_size)
    png = save_image_grid(images, args.out, rows=rows)
    _print(f"samples: {png} ({codes.shape[0]} images, {rows} row{'s' if rows > 1 else ''})")
    if args.codes_out:
        from safetensors.torch import save_file

        tensors = {"codes": codes.reshape(-1, *grid).contiguous()}
        if classes is not None:
            tensors["classes"] = classes.cpu().contiguous()
        target = Path(args.codes_out)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        save_file(tensors, str(tmp))
        os.replace(tmp, target)
        _print(f"codes: {target}")
    return 0


# ---------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="held-out bits per code vs a baseline, novelty, class consistency",
        description=(
            "Measure a prior on the held-out split of a code dataset (the same --val-fraction and --split-seed "
            "as training): bits per code against the class-conditional independent-per-position baseline, "
            "novelty of samples (not copies of a training grid), and, with --digits, class consistency judged "
            "by an SVC trained on the real training digits."
        ),
        formatter_class=_HelpFormatter,
    )
    p.add_argument("model", help="model folder (save_pretrained) or training run folder")
    p.add_argument("--data", required=True, help="code dataset folder the model was trained on")
    p.add_argument("--val-fraction", type=_fraction, default=DEFAULT_VAL_FRACTION,
                   help="held-out share, as in training")
    p.add_argument("--split-seed", type=_non_negative_int, default=0, help="as in training")
    p.add_argument("--samples-per-class", type=_positive_int, default=100,
                   help="samples per class (unconditional model: samples in all)")
    p.add_argument("--guidance-scale", type=float, default=2.0, help="for the guided samples")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="seeds the samples and the judge")
    p.add_argument("--digits", action="store_true", help="the data is the digits set: judge class consistency")
    p.add_argument("--codebook", help="the digits' patch codebook (needed with --digits)")
    p.add_argument("--patch", type=_positive_int, default=2, help="patch side of --codebook's vectors")
    p.add_argument("--out", help="write the metrics to this JSON file")
    p.add_argument("--device", default="auto", help="where to run: auto (the accelerator if any), cpu, cuda:0, ...")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_prior, fit_digit_judge
    from .training import check_compatible, write_json_atomic

    model = _load_model(args.model, args.device)
    dataset = _open_dataset(args.data)
    num_classes = dataset.num_classes if model.config.class_conditional else 0
    try:
        check_compatible(
            model.config, dataset.codebook_size, dataset.grid, num_classes, where=f"the dataset {args.data}"
        )
    except ValueError as err:
        raise CLIError(str(err)) from None
    if args.val_fraction == 0:
        raise CLIError("--val-fraction must be > 0: the figures are measured on the held-out split")
    train_part, val_part = _split(dataset, args.val_fraction, args.split_seed)
    to_pixels = judge = None
    if args.digits:
        from .codebook import Codebook
        from .digits import codes_to_images, load_digits_images

        if args.codebook is None:
            raise CLIError("--digits needs --codebook (the folder `codegpt fit-codebook --digits` wrote)")
        images, labels = load_digits_images()
        if len(dataset) != len(labels) or not model.config.class_conditional:
            raise CLIError(
                f"--digits expects the {len(labels)} digits with a class-conditional model; got {len(dataset)} "
                "items" + ("" if model.config.class_conditional else " and an unconditional model")
            )
        codebook = Codebook.from_pretrained(args.codebook)
        judge = fit_digit_judge(images[train_part.indices], labels[train_part.indices], seed=args.seed)

        def to_pixels(codes):
            return codes_to_images(codebook, codes, patch=args.patch)

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
        from .evaluation import digit_judge_accuracy

        val_idx = val_part.indices
        metrics.update(digit_judge_accuracy(judge, codebook, images[val_idx], labels[val_idx], patch=args.patch))
    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        _print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    if args.out:
        write_json_atomic(args.out, {"eval": metrics})
        _print(f"metrics: {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def _add_push(sub) -> None:
    try:
        from .hub import add_push_parser
    except ImportError as err:  # a broken install; every other command still works
        reason = str(err)
        p = sub.add_parser("push", help="share a trained prior on the Hugging Face Hub (unavailable)")

        def unavailable(_: argparse.Namespace) -> int:
            raise CLIError(f"`codegpt push` is unavailable: codegpt.hub failed to import ({reason})")

        p.set_defaults(func=unavailable)
        return
    add_push_parser(sub)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="codegpt",
        description=(
            "GPT-style autoregressive priors over discrete image codes. Start with `codegpt demo` (digits, "
            "no download, a few minutes on a laptop CPU)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"codegpt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_demo(sub)
    _add_fit_codebook(sub)
    _add_train(sub)
    _add_sample(sub)
    _add_eval(sub)
    _add_push(sub)
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
