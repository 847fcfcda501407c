"""The digits demo, the whole pipeline: images -> autoencoder -> post-hoc codebook -> prior -> images -> metrics.

``run_demo(DemoSettings())`` is what ``codegpt demo`` runs, on scikit-learn's 8x8 digits (no download):

1. train a small diffusers ``AutoencoderKL`` on the training split (8x8 -> 4x4 latents), freeze it;
2. encode the digits through it and fit the codebook post hoc on the training latents, through
   ``codegpt.images.encode_images`` with an ``ArraySource`` (the road a user's images take);
3. train a class-conditional prior on the 4x4 code grids;
4. sample every class, guided and unguided, decode through codebook + autoencoder;
5. judge and measure on the held-out split: bits per code against the class-conditional per-position
   baseline, class consistency (an SVC judge on real digits), novelty, the reconstruction MSE through
   autoencoder + codebook, FID against the real held-out digits with a feature network trained on the
   digits (``image_metrics.train_feature_net``) beside the reconstruction FID, and the wall time.

With ``autoencoder="patches"`` step 1 is the identity on 2x2 pixel patches (``PatchAutoencoder(8, 1,
2, scale=16)``; the codebook is fitted by ``digits.digits_code_dataset``), the earlier demo with its
figures unchanged. Everything is seeded and the split is fixed, so ``metrics.json`` is reproducible.
It writes::

    out/
      autoencoder/     the trained AutoencoderKL (diffusers save_pretrained)             [kl]
      codes/           encode_images' folder: codebook/, train/, val/, encoding.json     [kl]
      codebook/ data/  the patch codebook and the 1797 digits as 4x4 code grids          [patches]
      run/             the training run (model/, log.jsonl, samples.png, data.json, ...)
      samples.png      guided samples decoded to pixels, one row per class
      metrics.json     the figures above, the targets, timings
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._util import check_int, jsonable, write_json
from .autoencoders import PatchAutoencoder, train_autoencoder
from .data import CodeDataset, split_indices
from .digits import DIGITS_CLASS_NAMES, DIGITS_MAX_VALUE, digits_code_dataset, load_digits_images, patch_decoder
from .evaluation import class_consistency, evaluate_prior, fit_digit_judge
from .runs import load_model, save_image_grid
from .training import TrainingArguments, config_for, train

__all__ = ["DemoSettings", "TARGETS", "run_demo", "format_report"]

AUTOENCODERS = ("kl", "patches")
PRIOR_STEPS = {"kl": 700, "patches": 1000}  # the default of DemoSettings.steps

# What the demo must reach on the held-out split (see the README's demo table).
TARGETS = {
    "bits_ratio_max": 0.75,  # prior bits per code / class-conditional per-position baseline's
    "class_consistency_guided_min": 0.99,
    "class_consistency_unguided_min": 0.93,
    "judge_accuracy_min": 0.98,
    "novelty_min": 0.99,
    "codebook_mse_max": 1.0,  # held-out digits through autoencoder + codebook, 0-16 scale
    "wall_seconds_max": 150.0,
}

@dataclass
class DemoSettings:
    """Every knob of the demo; the defaults are the benchmarked run."""

    out_dir: str | Path = "codegpt-demo"
    seed: int = 0
    autoencoder: str = field(default="kl", metadata={
        "help": "kl: train a small diffusers AutoencoderKL on the digits; patches: 2x2 pixel patches, no training"})
    # Autoencoder (kl): (ae_width, 2 * ae_width) channels, 8x8 -> 4x4 x ae_latent_dim
    ae_width: int = field(default=32, metadata={"help": "channels of the autoencoder's first block"})
    ae_latent_dim: int = field(default=4, metadata={"help": "latent channels of the autoencoder"})
    ae_steps: int = field(default=500, metadata={"help": "autoencoder training steps"})
    ae_learning_rate: float = field(default=3e-3, metadata={"help": "autoencoder peak learning rate (one-cycle)"})
    ae_kl_weight: float = field(default=1e-6, metadata={"help": "weight of the autoencoder's KL term"})
    # Codes
    num_codes: int = 128
    patch: int = 2  # patches only
    val_fraction: float = 0.2
    # Prior (about 0.8M parameters)
    embed_dim: int = 128
    num_layers: int = 4
    num_heads: int = 4
    dropout: float = 0.25
    class_dropout: float = 0.05
    tie_embeddings: bool = True  # one table for the input codes and the output head
    # Training
    steps: int | None = field(default=None, metadata={
        "help": "prior training steps; default 1000 with patches, 700 with kl (its prior over-fits the 1438 grids "
                "after ~800 steps: held-out bits stop improving)"})
    batch_size: int = 64
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.3
    mixed_precision: str = "no"
    # Evaluation
    samples_per_class: int = 100
    guidance_scale: float = 2.0
    grid_columns: int = 10  # samples per class shown in samples.png
    feature_steps: int = field(default=600, metadata={
        "help": "training steps of the digits feature network that FID is measured with"})
    progress: bool = True

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        if self.autoencoder not in AUTOENCODERS:
            raise ValueError(f"autoencoder must be one of {AUTOENCODERS}, got {self.autoencoder!r}")
        if self.steps is None:
            self.steps = PRIOR_STEPS[self.autoencoder]
        for name in ("samples_per_class", "steps", "batch_size", "ae_width", "ae_latent_dim", "ae_steps",
                     "feature_steps", "num_codes"):
            check_int(name, getattr(self, name), low=1)
        check_int("grid_columns", self.grid_columns, 1, self.samples_per_class)  # at most samples_per_class
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1): the demo measures on held-out digits, got "
                             f"{self.val_fraction}")


@dataclass
class _Codes:
    """The demo's codes whichever the autoencoder: parts, real images of each part, pixel decoder."""

    train: Any
    val: Any
    dataset: CodeDataset
    train_images: torch.Tensor  # (n, 1, 8, 8) in [0, 1]
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    codebook: Any
    autoencoder: Any
    decode: Callable[[torch.Tensor], torch.Tensor]  # codes (B, 4, 4) -> images (B, 8, 8) in [0, 1]
    run_data: dict[str, Any]
    record: dict[str, Any]


class _Laps:
    """Wall and CPU seconds of each stage (CPU time: comparable between runs on a busy machine)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._last = (time.perf_counter(), time.process_time())

    def lap(self, name: str) -> None:
        now = (time.perf_counter(), time.process_time())
        self.wall[name], self.cpu[name] = now[0] - self._last[0], now[1] - self._last[1]
        self._last = now


def _kl_codes(s: DemoSettings, out: Path, laps: _Laps) -> _Codes:
    """Train the autoencoder on the training digits, then encode every digit through encode_images."""
    from .images import ArraySource, decode_codes, encode_images, load_source_indices

    images, labels = load_digits_images()
    x = (images / DIGITS_MAX_VALUE)[:, None]  # (N, 1, 8, 8) in [0, 1]
    # encode_images draws its split as CodeDataset.split (split_indices) does: the autoencoder is
    # trained on the same training images only, so the split is drawn first and checked below.
    train_idx, val_idx = split_indices(len(x), s.val_fraction, s.seed)
    autoencoder, record = train_autoencoder(
        x[train_idx], block_out_channels=(s.ae_width, 2 * s.ae_width), latent_channels=s.ae_latent_dim,
        steps=s.ae_steps, learning_rate=s.ae_learning_rate, kl_weight=s.ae_kl_weight, seed=s.seed,
        progress=s.progress,
    )
    ae_dir = out / "autoencoder"
    autoencoder.model.save_pretrained(ae_dir)
    autoencoder.source = str(ae_dir.resolve())  # recorded with the codes, so they decode without being told
    laps.lap("autoencoder")
    enc = encode_images(ArraySource(x, labels, class_names=DIGITS_CLASS_NAMES), autoencoder, out / "codes",
                        num_codes=s.num_codes, val_fraction=s.val_fraction, seed=s.seed, overwrite=True,
                        progress=s.progress)
    index = load_source_indices(enc.out_dir)
    if sorted(index["val"].tolist()) != sorted(val_idx):
        raise RuntimeError("encode_images drew another validation split than the autoencoder was trained for")
    train_set, val_set = CodeDataset(enc.train), CodeDataset(enc.val)
    codebook = enc.codebook
    laps.lap("codebook")
    return _Codes(
        train=train_set, val=val_set, dataset=train_set,
        train_images=x[index["train"]], train_labels=labels[index["train"]],
        val_images=x[index["val"]], val_labels=labels[index["val"]],
        codebook=codebook, autoencoder=autoencoder,
        decode=lambda codes: decode_codes(codes.cpu(), codebook, autoencoder)[:, 0],
        run_data={"data": str(enc.out_dir.resolve()), "codebook": str((enc.out_dir / "codebook").resolve()),
                  "autoencoder": autoencoder.spec(), "split": None},
        record={"autoencoder_training": record, "codebook_usage": enc.record["usage"]},
    )


def _patch_codes(s: DemoSettings, out: Path, laps: _Laps) -> _Codes:
    """The earlier demo's codes: a k-means codebook over 2x2 pixel patches, fitted on the training split."""
    laps.lap("autoencoder")  # none to train
    digits = digits_code_dataset(out, s.num_codes, s.patch, s.seed, s.val_fraction)
    images, labels = load_digits_images()
    x = (images / DIGITS_MAX_VALUE)[:, None]
    train_idx, val_idx = digits.train_indices, digits.val_indices
    cb = digits.metrics
    laps.lap("codebook")
    return _Codes(
        train=digits.train, val=digits.val, dataset=digits.dataset,
        train_images=x[train_idx], train_labels=labels[train_idx], val_images=x[val_idx], val_labels=labels[val_idx],
        codebook=digits.codebook, autoencoder=PatchAutoencoder(8, 1, s.patch, scale=DIGITS_MAX_VALUE),
        decode=patch_decoder(digits.codebook, s.patch),
        run_data={"data": str((out / "data").resolve()), "codebook": str((out / "codebook").resolve()),
                  "autoencoder": None, "split": {"val_fraction": s.val_fraction, "seed": s.seed}},
        record={"codebook_mse_fit": cb.get("mse_fit", cb["mse"])},
    )


def run_demo(settings: DemoSettings | None = None) -> dict[str, Any]:
    """Run the whole demo (see the module docstring); returns the report written to metrics.json."""
    from .image_metrics import image_metrics, reconstruction_metrics, train_feature_net

    s = DemoSettings() if settings is None else settings
    if not isinstance(s, DemoSettings):
        raise TypeError(f"settings must be a DemoSettings, got {type(s).__name__}")
    laps = _Laps()
    out = Path(s.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    codes = (_kl_codes if s.autoencoder == "kl" else _patch_codes)(s, out, laps)

    config = config_for(
        codes.dataset, dropout=s.dropout, embed_dim=s.embed_dim, num_layers=s.num_layers, num_heads=s.num_heads,
        class_dropout_prob=s.class_dropout, tie_word_embeddings=s.tie_embeddings,
    )
    args = TrainingArguments(
        output_dir=out / "run", max_steps=s.steps, per_device_batch_size=s.batch_size, learning_rate=s.learning_rate,
        warmup_steps=min(s.warmup_steps, s.steps), weight_decay=s.weight_decay, mixed_precision=s.mixed_precision,
        seed=s.seed, samples_per_class=min(s.grid_columns, 8), sample_guidance_scale=s.guidance_scale,
        overwrite_output_dir=True, progress=s.progress, log_every=25,
        save_every=0,  # a short run, started over each time: no checkpoints
    )
    grid = codes.dataset.grid
    # data_record: what the codes decode through, so `codegpt sample RUN` and `codegpt eval RUN` need no flags.
    result = train(args, config, codes.train, codes.val, decode=codes.decode, grid_shape=grid,
                   data_record=codes.run_data)
    laps.lap("train")

    # Judge and measure on the held-out digits. The judge sees pixels on the 0-16 scale.
    model = load_model(result.model_dir, device="cpu")
    judge = fit_digit_judge(codes.train_images[:, 0] * DIGITS_MAX_VALUE, codes.train_labels, seed=s.seed)
    metrics, samples = evaluate_prior(
        model, codes.train, codes.val, samples_per_class=s.samples_per_class, guidance_scale=s.guidance_scale,
        seed=s.seed, to_pixels=lambda c: _to_digits(codes, c), judge=judge,
        held_out=result.final_eval,  # measured by train() at the last step
    )
    val_x, val_y = codes.val_images, codes.val_labels
    through = codes.autoencoder.decode(codes.codebook.decode(codes.codebook.encode(codes.autoencoder.encode(val_x))))
    metrics["judge_accuracy_real"] = class_consistency(judge, val_x[:, 0] * DIGITS_MAX_VALUE, val_y)
    metrics["judge_accuracy"] = class_consistency(judge, through[:, 0] * DIGITS_MAX_VALUE, val_y)
    laps.lap("evaluate")

    # FID with a feature network trained on the real training digits: comparable between runs of
    # this demo, not with published FIDs (those use the standard Inception on natural images).
    feature = train_feature_net(codes.train_images, codes.train_labels, steps=s.feature_steps, seed=s.seed)
    recon = reconstruction_metrics(val_x, codes.autoencoder, codes.codebook, feature)
    squared = DIGITS_MAX_VALUE**2  # MSE on [0, 1] -> on the 0-16 scale
    metrics["codebook_mse"] = recon["mse_codebook"] * squared
    metrics["autoencoder_mse"] = recon["mse_autoencoder"] * squared
    fid = {"reconstruction": recon["fid_codebook"], "autoencoder_only": recon["fid_autoencoder"]}
    for name in ("guided", "unguided"):
        pixels = _to_digits(codes, samples[name][0].reshape(-1, *grid))[:, None] / DIGITS_MAX_VALUE
        figures = image_metrics(val_x, pixels, feature, kid=False)
        fid[name] = figures["fid"]
        fid[f"inception_score_{name}"] = figures["inception_score_mean"]
    fid["real_train_vs_val"] = image_metrics(val_x, codes.train_images, feature, kid=False,
                                             inception_score=False)["fid"]
    fid["feature_network"] = recon["feature_network"]
    metrics.update({f"fid_{k}" if not k.startswith(("inception", "feature")) else k: v for k, v in fid.items()})

    # The first grid_columns guided samples of each class, one row per class.
    guided = samples["guided"][0].reshape(codes.dataset.num_classes, s.samples_per_class, -1)[:, : s.grid_columns]
    png = save_image_grid(codes.decode(guided.reshape(-1, *grid)), out / "samples.png",
                          rows=codes.dataset.num_classes)
    laps.lap("fid")
    wall = {**laps.wall, "total": sum(laps.wall.values())}

    m, t = metrics, TARGETS
    met = {
        "bits_ratio": m["bits_ratio"] <= t["bits_ratio_max"],
        "class_consistency_guided": m["class_consistency_guided"] >= t["class_consistency_guided_min"],
        "class_consistency_unguided": m["class_consistency_unguided"] >= t["class_consistency_unguided_min"],
        "judge_accuracy": m["judge_accuracy"] >= t["judge_accuracy_min"],
        "novelty": min(m["novelty_guided"], m["novelty_unguided"]) >= t["novelty_min"],
        "all_distinct": bool(m["all_distinct_guided"] and m["all_distinct_unguided"]),
        "codebook_mse": m["codebook_mse"] <= t["codebook_mse_max"],
        "wall_seconds": wall["total"] <= t["wall_seconds_max"],
    }
    files = {"samples_png": str(png), "model": str(result.model_dir)}
    if s.autoencoder == "kl":
        files.update(autoencoder=str(out / "autoencoder"), codes=str(out / "codes"),
                     codebook=str(out / "codes" / "codebook"))
    else:
        files.update(codebook=str(out / "codebook"), data=str(out / "data"))
    report = {
        "eval": metrics,  # the held-out ("validation") quality figures; `codegpt push --metrics` reads these
        "targets": TARGETS,
        "targets_met": met,
        # total: without interpreter start-up and imports; time the command for those
        "timing_seconds": wall,
        "cpu_seconds": {**laps.cpu, "total": sum(laps.cpu.values())},  # all threads
        "model": {"parameters": sum(p.numel() for p in model.parameters()), "config": config.to_diff_dict()},
        "autoencoder": codes.autoencoder.spec(),
        **codes.record,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()},
        "split": {"train": len(codes.train_labels), "val": len(val_y), "seed": s.seed},
        "files": files,
    }
    report["model"]["config"].pop("transformers_version", None)
    report["autoencoder"].pop("config", None)  # in autoencoder/config.json
    write_json(out / "metrics.json", jsonable(report))
    return report


def _to_digits(codes: _Codes, grids: torch.Tensor) -> torch.Tensor:
    """Code grids (B, 4, 4) -> digits (B, 8, 8) on the judge's 0-16 scale, through codebook + autoencoder."""
    latents = codes.codebook.decode(grids.cpu())
    return codes.autoencoder.decode(latents)[:, 0] * DIGITS_MAX_VALUE


def format_report(report: dict[str, Any]) -> str:
    """A short human summary of ``run_demo``'s report."""
    m, t, met = report["eval"], report["targets"], report["targets_met"]
    ok = {key: "ok " if hit else "MISS" for key, hit in met.items()}
    times = report["timing_seconds"]
    through = "autoencoder + codebook" if report["autoencoder"]["kind"] != "patches" else "the patch codebook"
    lines = [
        f"held-out bits per code  {m['bits_per_code']:.3f}  (baseline {m['baseline_bits_per_code']:.3f}, "
        f"ratio {m['bits_ratio']:.3f} <= {t['bits_ratio_max']})  {ok['bits_ratio']}",
        f"class consistency       guided {m['class_consistency_guided']:.1%} (>= "
        f"{t['class_consistency_guided_min']:.0%}) {ok['class_consistency_guided']}, unguided "
        f"{m['class_consistency_unguided']:.1%} (>= {t['class_consistency_unguided_min']:.0%}) "
        f"{ok['class_consistency_unguided']}",
        f"judge accuracy          {m['judge_accuracy']:.1%} on held-out digits through {through} "
        f"(real {m['judge_accuracy_real']:.1%})  {ok['judge_accuracy']}",
        f"novelty                 {min(m['novelty_guided'], m['novelty_unguided']):.1%} "
        f"(all distinct: {met['all_distinct']})  {ok['novelty']}",
        f"reconstruction MSE      {m['codebook_mse']:.3f} on held-out digits through {through} (0-16 scale)  "
        f"{ok['codebook_mse']}",
        f"FID (digits features)   guided {m['fid_guided']:.2f}, unguided {m['fid_unguided']:.2f}; reconstruction "
        f"{m['fid_reconstruction']:.2f}, real train vs val {m['fid_real_train_vs_val']:.2f} (not comparable with "
        "published FIDs)",
        f"time                    {times['total']:.1f} s <= {t['wall_seconds_max']:.0f}  {ok['wall_seconds']} "
        f"(autoencoder {times['autoencoder']:.1f}, codebook {times['codebook']:.1f}, prior {times['train']:.1f}, "
        f"evaluate {times['evaluate']:.1f}, FID {times['fid']:.1f}; CPU {report['cpu_seconds']['total']:.1f} s)",
        f"samples                 {report['files']['samples_png']}",
        f"metrics                 {Path(report['files']['samples_png']).with_name('metrics.json')}",
        f"model                   {report['files']['model']}",
    ]
    return "\n".join(lines)
