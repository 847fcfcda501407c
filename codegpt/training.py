"""The training loop: one Accelerate loop for one CPU, one GPU or many processes.

``train(args, model, train_dataset, eval_dataset)`` runs it; ``codegpt train`` and the demo are thin
layers over it. Nothing here names a device: Accelerate picks it, and ``accelerate launch`` decides
how many processes share the work::

    codegpt train --data codes --out run                                   # one process
    accelerate launch --multi_gpu --num_processes 4 -m codegpt train ...   # four GPUs
    accelerate launch --config_file examples/accelerate_cpu2.yaml -m codegpt train ...  # two CPU processes

(``accelerate launch --cpu --num_processes 2`` starts a single process in Accelerate 1.x unless
mpirun is configured; the multi-GPU launcher, which the example config selects, starts one process
per rank, and on a machine without an accelerator they form a gloo group over the CPU.)

A run folder holds::

    run/
      training_args.json          the arguments, for the record
      log.jsonl                   one line per evaluation (step, held-out nats and bits per code)
      checkpoints/step-000500/    model/ (save_pretrained) + Accelerate state + trainer_state.json
      model/                      the final model (save_pretrained; loads with GPT.from_pretrained)
      samples.png                 a grid of samples at the end (one row per class)

Checkpoints are written to ``step-XXXXXX.tmp`` and renamed into place; ``trainer_state.json`` is
written last, so a folder without it (a kill mid-save) is never picked for resume. Resume is exact:
the data order is a pure function of (seed, epoch), the position in the epoch is saved, and
Accelerate restores the model, optimizer, scheduler and every RNG.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from .configuration_codegpt import GPTConfig
from .modeling_codegpt import GPT

__all__ = [
    "TrainingArguments",
    "TrainResult",
    "train",
    "make_accelerator",
    "evaluate",
    "parameter_groups",
    "lr_lambda",
    "find_resume_checkpoint",
    "check_compatible",
    "EpochBatchSampler",
    "render_codes",
    "save_image_grid",
    "write_json_atomic",
]

MIXED_PRECISION = ("no", "bf16", "fp16")
CHECKPOINT_RE = re.compile(r"^step-(\d{6,})$")
STATE_NAME = "trainer_state.json"  # written last: its presence marks a complete checkpoint

# Images (B, h, w) or (B, h, w, 3) with values in [0, 1], from codes (B, H, W).
Decoder = Callable[[torch.Tensor], "np.ndarray | torch.Tensor"]


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainingArguments:
    """What a training run does. Steps count optimizer updates, not micro-batches.

    The global batch is ``per_device_batch_size * num_processes * gradient_accumulation_steps``.
    Interval arguments (``eval_every``, ``save_every``, ``sample_every``) are in steps; 0 turns the
    periodic action off (evaluation and samples still happen once at the end).
    """

    output_dir: str | os.PathLike
    max_steps: int = 1000
    per_device_batch_size: int = 64
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    min_lr_ratio: float = 0.1  # the cosine decays to learning_rate * min_lr_ratio at max_steps
    warmup_steps: int = 100
    weight_decay: float = 0.1
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = 1.0
    mixed_precision: str | None = "no"  # "no" (fp32), "bf16", "fp16"; None: as Accelerate is configured
    seed: int = 0
    eval_every: int = 0
    eval_batch_size: int = 256
    save_every: int = 0
    save_total_limit: int = 2
    sample_every: int = 0
    samples_per_class: int = 8  # columns of the sample grid (rows of 8 for an unconditional model)
    sample_guidance_scale: float | None = None
    sample_temperature: float = 1.0
    log_every: int = 10
    resume: bool = False
    overwrite_output_dir: bool = False
    progress: bool = True
    num_workers: int = 0

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        for name, low in (
            ("max_steps", 1),
            ("per_device_batch_size", 1),
            ("gradient_accumulation_steps", 1),
            ("warmup_steps", 0),
            ("seed", 0),
            ("eval_every", 0),
            ("eval_batch_size", 1),
            ("save_every", 0),
            ("save_total_limit", 1),
            ("sample_every", 0),
            ("samples_per_class", 1),
            ("log_every", 1),
            ("num_workers", 0),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        _check_float("learning_rate", self.learning_rate, low=0.0, low_open=True)
        _check_float("min_lr_ratio", self.min_lr_ratio, low=0.0, high=1.0)
        _check_float("weight_decay", self.weight_decay, low=0.0)
        _check_float("adam_epsilon", self.adam_epsilon, low=0.0, low_open=True)
        _check_float("sample_temperature", self.sample_temperature, low=0.0)
        if len(self.adam_betas) != 2 or not all(
            isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in self.adam_betas
        ):
            raise ValueError(f"adam_betas must be two floats in [0, 1), got {self.adam_betas!r}")
        self.adam_betas = (float(self.adam_betas[0]), float(self.adam_betas[1]))
        if self.max_grad_norm is not None:
            _check_float("max_grad_norm", self.max_grad_norm, low=0.0, low_open=True)
        if self.sample_guidance_scale is not None:
            _check_float("sample_guidance_scale", self.sample_guidance_scale, low=0.0)
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"mixed_precision must be one of {MIXED_PRECISION} (fp32 is 'no') or None (what "
                f"`accelerate launch --mixed_precision` says), got {self.mixed_precision!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["output_dir"] = str(self.output_dir)
        d["adam_betas"] = list(self.adam_betas)
        return d


def _check_float(
    name: str, value: object, low: float, high: float | None = None, low_open: bool = False
) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        lo = f"({low}" if low_open else f"[{low}"
        hi = f"{high}]" if high is not None else "inf)"
        raise ValueError(f"{name} must be a number in {lo}, {hi}, got {value!r}")


@dataclass
class TrainResult:
    """What ``train`` leaves behind."""

    output_dir: Path
    model_dir: Path  # save_pretrained folder of the final model
    step: int
    resumed_from: Path | None
    eval_history: list[dict[str, float]] = field(default_factory=list)
    samples_png: Path | None = None

    @property
    def final_eval(self) -> dict[str, float] | None:
        return self.eval_history[-1] if self.eval_history else None


# ---------------------------------------------------------------------------------------------
# Optimizer and schedule
# ---------------------------------------------------------------------------------------------


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices (weights and embeddings, dim >= 2), none on biases and norms.

    Every trainable parameter lands in exactly one group; a tied weight, shared by two modules,
    counts once.
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # deduplicates tied parameters
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    grouped = [id(p) for p in decay + no_decay]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    if len(grouped) != len(set(grouped)) or set(grouped) != trainable:
        raise AssertionError("parameter groups must cover every trainable parameter exactly once")
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_lambda(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate multiplier: linear warmup from 0 over ``warmup_steps``, then a cosine from 1
    down to ``min_lr_ratio`` at ``max_steps``. ``step`` counts completed optimizer updates."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _make_schedule(args: TrainingArguments) -> Callable[[int], float]:
    # A plain closure: LambdaLR stores no state for functions, so the scheduler's state_dict stays
    # plain data (and loads with weights_only=True).
    def schedule(step: int) -> float:
        return lr_lambda(step, args.warmup_steps, args.max_steps, args.min_lr_ratio)

    return schedule


# ---------------------------------------------------------------------------------------------
# Data order
# ---------------------------------------------------------------------------------------------


class EpochBatchSampler(Sampler[list[int]]):
    """This process's batches of one epoch, a pure function of (seed, epoch).

    Epoch ``e`` is one permutation of the dataset drawn from ``(seed, e)``, cut into global batches
    of ``batch_size * num_processes`` indices; process ``r`` takes slice ``r`` of each. The last
    incomplete global batch is dropped so that every process steps together. ``start`` skips the
    samples already consumed in the epoch, which is how a resumed run picks up mid-epoch. The order
    depends on the global batch size only, not on how it is split across processes.
    """

    def __init__(
        self, num_samples: int, batch_size: int, num_processes: int, process_index: int, seed: int
    ) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.process_index = process_index
        self.seed = seed
        self.global_batch = batch_size * num_processes
        if num_samples < self.global_batch:
            raise ValueError(
                f"the training set has {num_samples} samples, fewer than one global batch "
                f"(per_device_batch_size {batch_size} x {num_processes} processes = {self.global_batch}); "
                "lower per_device_batch_size"
            )
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    def __len__(self) -> int:
        return (self.num_samples - self.start) // self.global_batch

    def __iter__(self) -> Iterator[list[int]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)
        for begin in range(self.start, self.num_samples - self.global_batch + 1, self.global_batch):
            mine = begin + self.process_index * self.batch_size
            yield order[mine : mine + self.batch_size].tolist()


class _DataStream:
    """Endless micro-batches for this process, epoch after epoch, that know where they are: the
    (epoch, samples consumed in it) pair a checkpoint saves and a resumed run starts from."""

    def __init__(self, dataset: Dataset, sampler: EpochBatchSampler, num_workers: int, seed: int,
                 epoch: int = 0, position: int = 0) -> None:
        self.dataset, self.sampler, self.num_workers, self.seed = dataset, sampler, num_workers, seed
        self.epoch, self.position = epoch, position
        self._batches = self._open()

    def _open(self) -> Iterator[dict[str, torch.Tensor]]:
        self.sampler.set_epoch(self.epoch, self.position)
        # An explicit generator: without it every new iterator draws its base seed from torch's
        # global RNG, which would shift dropout masks between an uninterrupted run and a resumed one.
        loader = DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
        )
        return iter(loader)

    def next(self) -> dict[str, torch.Tensor]:
        try:
            batch = next(self._batches)
        except StopIteration:
            self.epoch, self.position = self.epoch + 1, 0
            self._batches = self._open()
            batch = next(self._batches)
        self.position += self.sampler.global_batch
        return batch


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def check_compatible(
    config: GPTConfig,
    codebook_size: int,
    grid_shape: Sequence[int],
    num_classes: int,
    where: str = "the dataset",
) -> None:
    """Raise a ValueError saying what to fix when ``config`` cannot model ``where``'s codes."""
    H, W = (int(s) for s in grid_shape)
    problems = []
    if config.codebook_size != codebook_size:
        problems.append(
            f"codebook_size {config.codebook_size} != {codebook_size} (set vocab_size={codebook_size + 1}, "
            f"codebook_size={codebook_size})"
        )
    if config.seq_len != H * W:
        problems.append(f"seq_len {config.seq_len} != {H}x{W} = {H * W} codes per image (set seq_len={H * W})")
    if config.class_conditional and num_classes == 0:
        problems.append("the model is class-conditional but the codes have no classes (set class_conditional=False)")
    elif config.class_conditional and config.num_classes != num_classes:
        problems.append(f"num_classes {config.num_classes} != {num_classes} (set num_classes={num_classes})")
    if problems:
        raise ValueError(f"the model config does not match {where}: " + "; ".join(problems))


def _dataset_meta(dataset: Dataset) -> tuple[tuple[int, int] | None, int | None, int | None]:
    """(grid, codebook size, number of classes) from a code dataset's metadata (a
    ``codegpt.data.CodeDataset`` or a ``Subset`` of one); Nones for other datasets."""
    base = dataset
    while isinstance(base, torch.utils.data.Subset):
        base = base.dataset
    grid = getattr(base, "grid", None)
    if grid is None:
        return None, None, None
    return (int(grid[0]), int(grid[1])), getattr(base, "codebook_size", None), getattr(base, "num_classes", None)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON through a temporary file renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder into place; an old folder of that name is moved aside first
    (``os.replace`` cannot overwrite a non-empty folder) and then deleted."""
    if final.exists():
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _code_palette(num_codes: int) -> np.ndarray:
    """A fixed colour per code id, for viewing codes when no decoder is given."""
    rng = np.random.default_rng(0)
    return rng.uniform(0.15, 1.0, size=(num_codes, 3))


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
    cols = n // rows
    images = np.clip(images, 0.0, 1.0)
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    H, W = h * scale, w * scale
    canvas = np.full((rows * (H + pad) + pad, cols * (W + pad) + pad, 3), 0.5)
    for i in range(n):
        r, c = divmod(i, cols)
        canvas[pad + r * (H + pad) : pad + r * (H + pad) + H, pad + c * (W + pad) : pad + c * (W + pad) + W] = images[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    Image.fromarray((canvas * 255).round().astype(np.uint8)).save(tmp)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def _complete_checkpoints(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first: a ``step-N`` folder whose trainer_state.json parses."""
    found = []
    if not checkpoint_dir.is_dir():
        return found
    for entry in checkpoint_dir.iterdir():
        m = CHECKPOINT_RE.match(entry.name)
        if not m or not entry.is_dir():
            continue
        try:
            state = json.loads((entry / STATE_NAME).read_text())
        except (OSError, ValueError):
            continue  # half-written: the marker is written last
        if state.get("step") == int(m.group(1)):
            found.append((int(m.group(1)), entry))
    return sorted(found)


def find_resume_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run folder, or None."""
    found = _complete_checkpoints(Path(output_dir) / "checkpoints")
    return found[-1][1] if found else None


def _save_checkpoint(
    accelerator: Accelerator,
    model: torch.nn.Module,
    output_dir: Path,
    step: int,
    state: dict[str, Any],
    keep: int,
) -> Path:
    root = output_dir / "checkpoints"
    final = root / f"step-{step:06d}"
    tmp = root / f"step-{step:06d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left over from a kill mid-save
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every process writes its RNG state; main writes the rest
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(tmp / "model")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(tmp / STATE_NAME, state)
        _replace_dir(tmp, final)
        for _, old in _complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ---------------------------------------------------------------------------------------------
# Evaluation and samples
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset: Dataset,
    accelerator: Accelerator | None = None,
    batch_size: int = 256,
) -> dict[str, float]:
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
    loader = DataLoader(
        torch.utils.data.Subset(dataset, indices), batch_size=batch_size, shuffle=False,
        generator=torch.Generator(),
    )
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of nats, number of codes)
    for batch in loader:
        input_ids = batch["input_ids"].to(device)
        labels = batch["labels"].to(device)
        classes = batch["classes"].to(device) if conditional else None
        with autocast():  # a fresh context each batch: these are single-use
            logits = module(input_ids=input_ids, classes=classes, use_cache=False).logits
        targets = F.pad(labels[:, 1:], (0, 1), value=-100)
        nats = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
            reduction="sum",
        )
        total += torch.stack([nats.double(), (targets != -100).sum().double()])
    if world > 1:
        total = accelerator.reduce(total, reduction="sum")
    module.train(was_training)
    nats, count = float(total[0]), float(total[1])
    if count == 0:
        raise ValueError("the evaluation set holds no codes")
    mean = nats / count
    return {"loss_nats": mean, "bits_per_code": mean / math.log(2), "num_codes": int(count)}


def _sample_codes(
    module: GPT, num_per_class: int, guidance_scale: float | None, temperature: float, seed: int
) -> tuple[torch.Tensor, int]:
    """(codes (rows * cols, seq_len), rows): one row per class, or rows of ``num_per_class``."""
    from .sampling import generate

    config = module.config
    device = next(module.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    if config.class_conditional:
        rows = config.num_classes
        classes = torch.arange(rows, device=device).repeat_interleave(num_per_class)
        codes = generate(
            module, classes=classes, guidance_scale=guidance_scale, temperature=temperature, generator=generator
        )
    else:
        rows = 1
        codes = generate(module, num_samples=num_per_class, temperature=temperature, generator=generator)
    return _strip_start(codes, config), rows


def _strip_start(tokens: torch.Tensor, config: GPTConfig) -> torch.Tensor:
    """Codes (B, seq_len) from generate()'s output, with or without the start column."""
    if tokens.shape[-1] == config.seq_len + 1:
        tokens = tokens[:, 1:]
    if tokens.shape[-1] != config.seq_len:
        raise ValueError(f"expected {config.seq_len} codes per sample, got shape {tuple(tokens.shape)}")
    return tokens


def render_codes(codes: torch.Tensor, grid_shape: tuple[int, int], decode: Decoder | None, num_codes: int):
    """Images in [0, 1] for codes (B, seq_len): decoded pixels, or one colour per code."""
    codes = codes.reshape(codes.shape[0], *grid_shape).cpu()
    if decode is not None:
        images = decode(codes)
        return images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    return _code_palette(num_codes)[codes.numpy()]


def _write_samples(
    accelerator: Accelerator,
    model: torch.nn.Module,
    args: TrainingArguments,
    path: Path,
    grid_shape: tuple[int, int],
    decode: Decoder | None,
) -> Path | None:
    """Sample a grid on the main process; the others wait. Sampling uses its own generator, so the
    training RNG stream (dropout, class dropout) is the same with or without samples."""
    written = None
    if accelerator.is_main_process:
        module = accelerator.unwrap_model(model)
        was_training = module.training
        module.eval()
        with accelerator.autocast():
            codes, rows = _sample_codes(
                module, args.samples_per_class, args.sample_guidance_scale, args.sample_temperature, args.seed
            )
        module.train(was_training)
        images = render_codes(codes, grid_shape, decode, module.config.codebook_size)
        written = save_image_grid(images, path, rows=rows)
    accelerator.wait_for_everyone()
    return written


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def make_accelerator(args: TrainingArguments) -> Accelerator:
    """The ``Accelerator`` that ``train`` makes from ``args``.

    Make it yourself, first thing, when a script needs the process group before training (e.g. to
    let the main process write the data while the others wait) and pass it to ``train``: Accelerate
    keeps one state per process, and the first object to create it decides its settings.
    """
    return Accelerator(
        # Without this, Accelerate on a machine with no accelerator treats the processes that
        # torchrun (`accelerate launch --multi_gpu`) starts as unrelated single processes; with it
        # they form one gloo process group. Where an accelerator exists, Accelerate picks it.
        cpu=not _has_accelerator(),
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        # The schedule is defined in optimizer steps; by default Accelerate would step it once per
        # process per update.
        step_scheduler_with_optimizer=False,
    )


def _has_accelerator() -> bool:
    """Whether torch sees any accelerator (CUDA, ROCm, XPU, MPS, ...)."""
    if hasattr(torch, "accelerator"):  # torch >= 2.6
        return torch.accelerator.is_available()
    return torch.cuda.is_available() or (hasattr(torch.backends, "mps") and torch.backends.mps.is_available())


def _prepare_output_dir(args: TrainingArguments, accelerator: Accelerator) -> Path | None:
    """Decide where to start: the newest complete checkpoint (resume) or nothing."""
    out = Path(args.output_dir)
    if accelerator.is_main_process and (out / "checkpoints").is_dir():
        for partial in (out / "checkpoints").glob("step-*.tmp"):  # saves cut short by a kill
            shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    resume_from = find_resume_checkpoint(out)
    if resume_from is not None and not args.resume:
        if not args.overwrite_output_dir:
            raise ValueError(
                f"output_dir {out} already holds checkpoints (newest {resume_from.name}); pass resume=True "
                "(--resume) to continue that run, overwrite_output_dir=True (--overwrite-output-dir) to "
                "start over, or choose another output_dir"
            )
        if accelerator.is_main_process:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        accelerator.wait_for_everyone()
        resume_from = None
    if args.resume and resume_from is None:
        accelerator.print(f"resume: no complete checkpoint in {out / 'checkpoints'}; starting from step 0")
    return resume_from if args.resume else None


def _optimizer_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    data: _DataStream,
    args: TrainingArguments,
) -> torch.Tensor:
    """One update: ``gradient_accumulation_steps`` micro-batches, then clipping, AdamW and the
    schedule. Returns the mean micro-batch loss (detached)."""
    model.train()
    device = accelerator.device
    conditional = accelerator.unwrap_model(model).config.class_conditional
    total = torch.zeros((), device=device)
    for _ in range(args.gradient_accumulation_steps):
        batch = data.next()
        with accelerator.accumulate(model):  # no gradient sync across processes until the last
            loss = model(
                input_ids=batch["input_ids"].to(device),
                labels=batch["labels"].to(device),
                classes=batch["classes"].to(device) if conditional else None,
                use_cache=False,
            ).loss
            accelerator.backward(loss)  # scaled by 1 / gradient_accumulation_steps
            if accelerator.sync_gradients and args.max_grad_norm is not None:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()  # a no-op until the last micro-batch
            if accelerator.sync_gradients:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        total += loss.detach().float()
    return total / args.gradient_accumulation_steps


def _restore(
    accelerator: Accelerator, checkpoint: Path, global_batch: int
) -> tuple[int, int, int, list[dict[str, float]]]:
    """Load a checkpoint's model, optimizer, scheduler and RNG states; return where it stopped:
    (step, epoch, samples consumed in that epoch, evaluations so far)."""
    accelerator.load_state(str(checkpoint))
    state = json.loads((checkpoint / STATE_NAME).read_text())
    if state.get("global_batch") != global_batch:
        accelerator.print(
            f"warning: the global batch changed since {checkpoint.name} ({state.get('global_batch')} -> "
            f"{global_batch}); training goes on from the same sample but will not match the original run"
        )
    accelerator.print(f"resumed from {checkpoint} at step {state['step']}")
    return state["step"], state["epoch"], state["position"], state.get("eval_history", [])


def train(
    args: TrainingArguments,
    model: GPT | GPTConfig,
    train_dataset: Dataset,
    eval_dataset: Dataset | None = None,
    *,
    decode: Decoder | None = None,
    grid_shape: tuple[int, int] | None = None,
    accelerator: Accelerator | None = None,
) -> TrainResult:
    """Train a GPT prior on a code dataset and return where the results are.

    Args:
        args: the run (see :class:`TrainingArguments`).
        model: a ``GPT``, or a ``GPTConfig`` to build one from after seeding (so the initial
            weights depend on ``args.seed`` only).
        train_dataset: items ``{"input_ids": (seq_len+1,), "labels": (seq_len+1,), "classes": ()}``
            as yielded by :class:`codegpt.data` datasets.
        eval_dataset: held-out items of the same form; evaluated every ``eval_every`` steps and at
            the end, in nats and bits per code.
        decode: turns codes (B, H, W) into images (B, h, w[, 3]) in [0, 1] for the sample grid;
            without it each code is drawn as one coloured cell.
        grid_shape: (H, W) of the code grid; default the dataset's, else square, else one row.
        accelerator: an ``Accelerator`` to use; by default one is made from ``args``.
    """
    if not isinstance(args, TrainingArguments):
        raise TypeError(f"args must be a TrainingArguments, got {type(args).__name__}")
    if accelerator is None:
        accelerator = make_accelerator(args)
    elif accelerator.gradient_accumulation_steps != args.gradient_accumulation_steps:
        raise ValueError(
            f"accelerator.gradient_accumulation_steps ({accelerator.gradient_accumulation_steps}) must equal "
            f"args.gradient_accumulation_steps ({args.gradient_accumulation_steps})"
            " (make it with make_accelerator(args))"
        )
    out = Path(args.output_dir)
    resume_from = _prepare_output_dir(args, accelerator)

    set_seed(args.seed)  # identical initial weights on every process
    if isinstance(model, GPTConfig):
        model = GPT(model)
    elif not isinstance(model, GPT):
        raise TypeError(f"model must be a GPT or a GPTConfig, got {type(model).__name__}")
    config = model.config
    data_grid, codebook_size, num_classes = _dataset_meta(train_dataset)
    if data_grid is not None and codebook_size is not None:
        check_compatible(config, codebook_size, data_grid, num_classes or 0)
    grid_shape = grid_shape or data_grid
    if grid_shape is None:
        side = math.isqrt(config.seq_len)
        grid_shape = (side, side) if side * side == config.seq_len else (1, config.seq_len)
    if grid_shape[0] * grid_shape[1] != config.seq_len:
        raise ValueError(f"grid_shape {tuple(grid_shape)} must hold seq_len={config.seq_len} codes")
    model.train()

    optimizer = torch.optim.AdamW(
        parameter_groups(model, args.weight_decay),
        lr=args.learning_rate,
        betas=args.adam_betas,
        eps=args.adam_epsilon,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _make_schedule(args))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    module: GPT = accelerator.unwrap_model(model)

    sampler = EpochBatchSampler(
        len(train_dataset),
        args.per_device_batch_size,
        accelerator.num_processes,
        accelerator.process_index,
        args.seed,
    )
    global_batch = sampler.global_batch * args.gradient_accumulation_steps
    step, epoch, position, eval_history = 0, 0, 0, []  # position: samples consumed in the epoch
    if resume_from is not None:
        step, epoch, position, eval_history = _restore(accelerator, resume_from, global_batch)
    else:
        # Different dropout masks on each process; the same stream on every restart.
        set_seed(args.seed, device_specific=True)

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "training_args.json", args.to_dict())
        # The log holds this run's evaluations up to where it starts: none, or the checkpoint's
        # (a run killed after an evaluation but before its next checkpoint repeats that step).
        _write_text_atomic(out / "log.jsonl", "".join(json.dumps(m) + "\n" for m in eval_history))

    data = _DataStream(train_dataset, sampler, args.num_workers, args.seed, epoch, position)
    codes_per_micro = sampler.global_batch * config.seq_len
    start_step = step

    def trainer_state() -> dict[str, Any]:
        return {
            "step": step,
            "epoch": data.epoch,
            "position": data.position,
            "global_batch": global_batch,
            "num_processes": accelerator.num_processes,
            "eval_history": eval_history,
        }

    def run_eval() -> None:
        if eval_dataset is None:
            return
        metrics = {"step": step, **evaluate(model, eval_dataset, accelerator, args.eval_batch_size)}
        eval_history.append(metrics)
        if accelerator.is_main_process:
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            bar.write(
                f"step {step}: held-out {metrics['loss_nats']:.4f} nats, {metrics['bits_per_code']:.4f} bits per code"
            )

    bar = tqdm(
        total=args.max_steps, initial=step, desc="train", unit="step", disable=not (
            args.progress and accelerator.is_main_process
        ), dynamic_ncols=True,
    )
    window_loss = torch.zeros((), device=accelerator.device)
    window_steps, window_start = 0, time.perf_counter()
    while step < args.max_steps:
        window_loss += _optimizer_step(accelerator, model, optimizer, scheduler, data, args)
        step += 1
        window_steps += 1
        bar.update(1)

        if step % args.log_every == 0 or step == args.max_steps:
            loss = accelerator.reduce(window_loss, reduction="mean") if accelerator.num_processes > 1 else window_loss
            elapsed = time.perf_counter() - window_start
            codes_per_s = window_steps * args.gradient_accumulation_steps * codes_per_micro / max(elapsed, 1e-9)
            bar.set_postfix(
                loss=f"{float(loss) / window_steps:.4f}",
                lr=f"{scheduler.get_last_lr()[0]:.2e}",
                tok_s=f"{codes_per_s:,.0f}",
            )
            window_loss.zero_()
            window_steps, window_start = 0, time.perf_counter()
        if args.eval_every and step % args.eval_every == 0 and step < args.max_steps:
            run_eval()
        if args.sample_every and step % args.sample_every == 0 and step < args.max_steps:
            _write_samples(accelerator, model, args, out / f"samples-step-{step:06d}.png", grid_shape, decode)
        # Last in the step: the RNG state saved here is the one the next step starts from.
        if args.save_every and step % args.save_every == 0 and step < args.max_steps:
            _save_checkpoint(accelerator, model, out, step, trainer_state(), args.save_total_limit)
    bar.close()

    if not eval_history or eval_history[-1]["step"] != step:
        run_eval()
    if args.save_every and step > start_step:  # not when a finished run is resumed
        _save_checkpoint(accelerator, model, out, step, trainer_state(), args.save_total_limit)
    model_dir = out / "model"
    if accelerator.is_main_process:
        tmp = out / "model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        module.save_pretrained(tmp)
        _replace_dir(tmp, model_dir)
    accelerator.wait_for_everyone()
    samples = _write_samples(accelerator, model, args, out / "samples.png", grid_shape, decode)
    return TrainResult(
        output_dir=out,
        model_dir=model_dir,
        step=step,
        resumed_from=resume_from,
        eval_history=eval_history,
        samples_png=samples,
    )
