"""How good is a prior: held-out bits per code against an independent per-position baseline (their
ratio says how much the transformer gains from modelling codes jointly), novelty (a prior that memorised
its training set scores near 0) and class consistency (the fraction of decoded samples a judge labels
with their class). ``evaluate_prior`` measures everything on one split, as ``codegpt eval`` and the demo
report it."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset, Subset

from ._util import check_float
from .digits import codes_to_images, patchify
from .modeling_codegpt import GPT
from .runs import sample_classes

__all__ = [
    "evaluate", "evaluate_prior", "code_arrays", "independent_baseline_bits", "novelty", "fit_digit_judge",
    "digit_judge_accuracy", "class_consistency", "fit_image_judge", "judge_accuracy",
]


def code_arrays(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor | None]:
    """All codes (N, seq_len) and classes (N,) (None if unlabelled) of a code dataset or Subset."""
    indices = list(range(len(dataset)))
    # One gather per shard where the dataset (or a Subset's, through torch's Subset) has __getitems__.
    items = dataset.__getitems__(indices) if hasattr(dataset, "__getitems__") else [dataset[i] for i in indices]
    if not items:
        raise ValueError("the dataset is empty")
    codes = torch.stack([item["input_ids"][1:] for item in items])
    classes = torch.stack([item["classes"] for item in items]) if "classes" in items[0] else None
    return codes, classes


def independent_baseline_bits(train_codes: torch.Tensor, train_classes: torch.Tensor | None, eval_codes: torch.Tensor,
                              eval_classes: torch.Tensor | None, codebook_size: int, num_classes: int = 0,
                              alpha: float = 1.0) -> float:
    """Bits per code of the independent-per-position model on ``eval_codes``.

    For each (class, position) a histogram of the training codes, plus ``alpha`` on every code
    (add-one smoothing by default); each held-out code is scored by its own class and position.
    With ``num_classes=0`` (or no classes) the histograms are per position only.
    """
    if train_codes.dim() != 2 or eval_codes.dim() != 2 or train_codes.shape[1] != eval_codes.shape[1]:
        raise ValueError("train_codes and eval_codes must both be (N, seq_len) with the same seq_len, got "
                         f"{tuple(train_codes.shape)} and {tuple(eval_codes.shape)}")
    check_float("alpha", alpha, 0.0, low_open=True)
    L = train_codes.shape[1]
    conditional = num_classes > 0 and train_classes is not None and eval_classes is not None
    C = num_classes if conditional else 1
    yt = train_classes.long() if conditional else torch.zeros(len(train_codes), dtype=torch.long)
    ye = eval_classes.long() if conditional else torch.zeros(len(eval_codes), dtype=torch.long)
    counts = torch.full((C, L, codebook_size), float(alpha), dtype=torch.float64)
    pos = torch.arange(L)
    counts.index_put_((yt[:, None].expand(-1, L), pos.expand(len(yt), -1), train_codes.long()),
                      torch.ones(len(yt), L, dtype=torch.float64), accumulate=True)
    log_p = (counts / counts.sum(-1, keepdim=True)).log()
    nll = -log_p[ye[:, None].expand(-1, L), pos.expand(len(ye), -1), eval_codes.long()]
    return float(nll.mean()) / math.log(2)


def novelty(samples: torch.Tensor, train_codes: torch.Tensor) -> dict[str, Any]:
    """Copies and duplicates among sampled code grids (B, ...) against training grids (N, ...).

    Returns ``novelty`` (fraction of samples equal to no training grid), ``distinct`` (fraction of
    samples that are unique among the samples) and ``all_distinct``.
    """
    samples = samples.reshape(samples.shape[0], -1).cpu().long()
    train_codes = train_codes.reshape(train_codes.shape[0], -1).cpu().long()
    if samples.shape[1] != train_codes.shape[1]:
        raise ValueError(f"samples have {samples.shape[1]} codes each but training grids {train_codes.shape[1]}")
    seen = {row.tobytes() for row in train_codes.numpy()}
    keys = [row.tobytes() for row in samples.numpy()]
    copies, unique, n = sum(k in seen for k in keys), len(set(keys)), len(keys)
    return {"novelty": 1.0 - copies / n, "distinct": unique / n, "all_distinct": unique == n}


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: Dataset, accelerator: Accelerator | None = None,
             batch_size: int = 256) -> dict[str, float]:
    """Held-out loss of ``model`` on ``dataset``: mean nats and bits per code.

    Every code is a target; the start token never is. Classes are given when the model is
    class-conditional (the conditional likelihood). With an ``accelerator`` each process scores its
    share and the sums are reduced; without one the model is scored where it is, in one process.
    """
    module = accelerator.unwrap_model(model) if accelerator is not None else model
    conditional = module.config.class_conditional
    was_training = module.training
    module.eval()
    if accelerator is not None:
        device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
        autocast = accelerator.autocast
    else:
        device, rank, world = next(module.parameters()).device, 0, 1
        autocast = contextlib.nullcontext
    indices = list(range(rank, len(dataset), world))
    # A generator of its own: a DataLoader without one draws a seed from torch's global RNG on every
    # iteration, which would shift the dropout masks of the training steps that follow.
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, generator=torch.Generator())
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of nats, number of codes)
    for batch in loader:
        input_ids = batch["input_ids"].to(device)
        labels = batch["labels"].to(device)
        classes = batch["classes"].to(device) if conditional else None
        with autocast():  # a fresh context each batch: these are single-use
            logits = module(input_ids=input_ids, classes=classes, use_cache=False).logits
        targets = F.pad(labels[:, 1:], (0, 1), value=-100)
        nats = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        total += torch.stack([nats.double(), (targets != -100).sum().double()])
    if world > 1:
        total = accelerator.reduce(total, reduction="sum")
    module.train(was_training)
    nats, count = float(total[0]), float(total[1])
    if count == 0:
        raise ValueError("the evaluation set holds no codes")
    mean = nats / count
    return {"loss_nats": mean, "bits_per_code": mean / math.log(2), "num_codes": int(count)}


def _flat(images: torch.Tensor | np.ndarray) -> np.ndarray:
    return np.asarray(images, dtype=np.float64).reshape(len(images), -1)  # (N, pixels)


def fit_digit_judge(images: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, seed: int = 0):
    """An SVC (RBF kernel, C=10, gamma='scale') on real pixels (N, ...): on the digits (N, 8, 8), values
    0-16, it scores about 99% held out. Logistic regression is too weak a judge here: it confuses real
    1s, 8s and 9s often enough to blur the measurement."""
    try:
        from sklearn.svm import SVC
    except ImportError as err:
        raise ImportError("the class-consistency judge needs scikit-learn: pip install 'codegpt[demo]'") from err
    return SVC(C=10.0, gamma="scale", random_state=seed).fit(_flat(images), np.asarray(labels))


def digit_judge_accuracy(judge: Any, codebook: Any, images: torch.Tensor, labels: torch.Tensor,
                         patch: int = 2) -> dict[str, float]:
    """The judge's accuracy on real digits (N, 8, 8) and on the same digits passed through the patch
    codebook (encode, decode): how far its verdicts on decoded samples can be trusted."""
    reconstructed = codes_to_images(codebook, codebook.encode(patchify(images, patch)), patch=patch)
    return {"judge_accuracy_real": class_consistency(judge, images, labels),
            "judge_accuracy": class_consistency(judge, reconstructed, labels)}


def fit_image_judge(train_part: Dataset, to_pixels: Any, seed: int = 0, max_items: int = 2000):
    """A judge for any labelled code dataset: an SVC (RBF, C=10) on the pixels of its real training items
    decoded through codebook and autoencoder (``to_pixels``: codes (N, H, W) -> images (N, ...)), the
    images the prior learnt from. At most ``max_items`` items (a seeded draw) keep the fit quick."""
    codes, classes = code_arrays(train_part)
    if classes is None:
        raise ValueError("the training data is unlabelled: there is no class consistency to judge")
    if len(codes) > max_items:
        keep = torch.randperm(len(codes), generator=torch.Generator().manual_seed(seed))[:max_items]
        codes, classes = codes[keep], classes[keep]
    grid = getattr(train_part, "dataset", train_part).grid
    return fit_digit_judge(to_pixels(codes.reshape(-1, *grid)), classes, seed)


def judge_accuracy(judge: Any, val_part: Dataset, to_pixels: Any) -> float:
    """The judge's accuracy on the decoded real held-out items: how far its verdicts can be trusted."""
    codes, classes = code_arrays(val_part)
    grid = getattr(val_part, "dataset", val_part).grid
    return class_consistency(judge, to_pixels(codes.reshape(-1, *grid)), classes)


def class_consistency(judge: Any, images: torch.Tensor | np.ndarray, classes: torch.Tensor | np.ndarray) -> float:
    """Fraction of ``images`` (N, ...) that ``judge.predict`` labels with ``classes`` (N,)."""
    return float((judge.predict(_flat(images)) == np.asarray(classes)).mean())


def evaluate_prior(
    model: GPT, train_part: Dataset, val_part: Dataset, *, samples_per_class: int = 100,
    guidance_scale: float | None = 2.0, seed: int = 0, to_pixels: Any = None, judge: Any = None,
    held_out: dict[str, float] | None = None, batch_size: int = 512,
) -> tuple[dict[str, Any], dict[str, tuple[torch.Tensor, torch.Tensor | None]]]:
    """Every quality figure of a prior on one split, and the samples they were measured on.

    Metrics: ``bits_per_code``, ``loss_nats`` (on ``val_part``, or ``held_out`` if given),
    ``baseline_bits_per_code``, ``bits_ratio``; per sample set (``guided`` and ``unguided``, or
    ``unconditional``) ``novelty_<set>``, ``all_distinct_<set>``, and ``class_consistency_<set>``
    when ``to_pixels`` (codes (B, H, W) -> images) and ``judge`` (with ``predict``) are given.
    ``samples`` maps each set to (codes (N, seq_len), classes or None).
    """
    config = model.config
    held_out = held_out or evaluate(model, val_part, batch_size=batch_size)
    train_codes, train_classes = code_arrays(train_part)
    val_codes, val_classes = code_arrays(val_part)
    num_classes = config.num_classes if config.class_conditional else 0
    baseline = independent_baseline_bits(train_codes, train_classes, val_codes, val_classes, config.codebook_size,
                                         num_classes)
    metrics: dict[str, Any] = {"bits_per_code": held_out["bits_per_code"], "loss_nats": held_out["loss_nats"],
                               "baseline_bits_per_code": baseline, "bits_ratio": held_out["bits_per_code"] / baseline}
    samples: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    if config.class_conditional:
        # Distinct seeds: the two sets are independent draws.
        samples["guided"] = sample_classes(model, samples_per_class, guidance_scale=guidance_scale, seed=seed + 1)
        samples["unguided"] = sample_classes(model, samples_per_class, seed=seed + 2)
    else:
        samples["unconditional"] = sample_classes(model, samples_per_class, seed=seed + 1)
    grid = getattr(getattr(train_part, "dataset", train_part), "grid", None)
    for name, (codes, classes) in samples.items():
        nov = novelty(codes, train_codes)
        metrics[f"novelty_{name}"] = nov["novelty"]
        metrics[f"all_distinct_{name}"] = nov["all_distinct"]
        if to_pixels is not None and judge is not None and classes is not None:
            shape = tuple(grid) if grid is not None else (1, config.seq_len)
            pixels = to_pixels(codes.reshape(-1, *shape))
            metrics[f"class_consistency_{name}"] = class_consistency(judge, pixels, classes)
    return metrics, samples
