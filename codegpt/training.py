"""The training loop: one Accelerate loop for one CPU, one GPU or many processes (``accelerate launch``)::

    codegpt train --data codes --out run                                   # one process
    accelerate launch --multi_gpu --num_processes 4 -m codegpt train ...   # four GPUs
    accelerate launch --config_file examples/accelerate_cpu2.yaml -m codegpt train ...  # two CPU processes

(``accelerate launch --cpu --num_processes 2`` starts a single process in Accelerate 1.x unless
mpirun is configured; the multi-GPU launcher, which the example config selects, starts one process
per rank, and on a machine without an accelerator they form a gloo group over the CPU.)

Resume is exact: the data order is a pure function of (seed, epoch), the position in the epoch is
saved, and Accelerate restores the model, optimizer, scheduler and every RNG (run folder: ``codegpt.runs``).
It is also safe: a checkpoint is restored only when its manifest, hashes and trainer state check out (a
damaged newest one is skipped for the previous complete one, with a warning), the model is rebuilt from
the checkpoint's config, and a resume that would change the run (model, data, seed, batch, optimizer,
schedule: everything but ``RESUMABLE``) is refused with the list of differences. One run at a time trains
into a folder (``train.lock``), and a finished run is never overwritten unless asked.
"""

from __future__ import annotations

import datetime
import hashlib
import inspect
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import LoggerType, broadcast_object_list, set_seed
from accelerate.utils import load as load_accelerate_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from . import runs
from ._util import (
    check_choice,
    check_float,
    check_int,
    check_path,
    file_record,
    jsonable,
    read_json,
    replace_dir,
    resolve_device,
    write_json,
)
from .configuration_codegpt import GPTConfig
from .evaluation import evaluate
from .fast.kernels import remove_cpu_kernels, use_cpu_kernels
from .modeling_codegpt import GPT
from .runs import Decoder

__all__ = [
    "TrainingArguments", "TrainResult", "train", "make_accelerator", "parameter_groups", "lr_lambda",
    "check_compatible", "config_for", "EpochBatchSampler", "RESUMABLE", "data_identity", "make_ema", "TRACKERS",
]

MIXED_PRECISION = ("no", "bf16", "fp16")
# Accelerate's experiment trackers, by the names transformers' `report_to` uses ("all": every one installed).
TRACKERS = tuple(t.value for t in LoggerType if t.value != "all")

# The arguments a resume may change: how far the run goes (the cosine then ends at the new max_steps), how
# it logs, evaluates, samples, saves and loads data, and how fast it computes the same step (torch.compile,
# gradient checkpointing: the same math; compiled kernels round differently, and draw dropout masks from
# their own generator). Every other argument decides the weights (seed, batch, accumulation, optimizer and
# its fused kernel, which the checkpoint's optimizer state carries, schedule, precision) and must stay as
# the run started; so must the model config and the data.
RESUMABLE = frozenset({
    "output_dir", "max_steps", "eval_every", "eval_batch_size", "save_every", "save_total_limit", "sample_every",
    "samples_per_class", "sample_guidance_scale", "sample_temperature", "log_every", "progress", "num_workers",
    "torch_compile", "torch_compile_backend", "gradient_checkpointing",
    "report_to", "logging_dir", "eval_ema",
})
_HOW_STARTED = frozenset({"resume", "overwrite_output_dir"})  # how a start was asked for, not a setting
# Where a fine-tuning run's first weights came from: a resume continues from its checkpoint whatever they say,
# and refuses another source only when one is given.
_INIT_FIELDS = ("init_from", "init_revision")
# The GPTConfig fields a fine-tuning run may set anew: they shape no weight.
_DROPOUT_FIELDS = frozenset({"embd_dropout", "attn_dropout", "resid_dropout", "class_dropout_prob"})
# The GPTConfig fields that make the model (use_cache only changes what generate() keeps).
_MODEL_FIELDS = tuple(name for name in inspect.signature(GPTConfig.__init__).parameters
                      if name not in ("self", "kwargs", "use_cache"))


@dataclass
class TrainingArguments:
    """What a training run does. Steps count optimizer updates, not micro-batches.

    The global batch is ``per_device_batch_size * num_processes * gradient_accumulation_steps``.
    Interval arguments (``eval_every``, ``save_every``, ``sample_every``) are in steps; 0 turns the
    periodic action off (evaluation and samples still happen at the end; the last checkpoint does not).
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
    # Fine-tuning: the weights (and model config) of a run, model folder or Hub id ``org/name`` at init_revision
    # start the run; the optimizer, schedule and step start anew.
    init_from: str | None = None
    init_revision: str | None = None
    adam_fused: bool | None = None  # AdamW's fused kernel; None: where the device has one (CUDA, CPU)
    torch_compile: bool = False  # torch.compile the training step's forward and backward
    torch_compile_backend: str | None = None  # torch.compile's backend; None: its default (inductor)
    gradient_checkpointing: bool = False  # recompute each block's activations in backward: less memory, more time
    seed: int = 0
    eval_every: int = 0
    eval_batch_size: int = 256
    save_every: int = 500  # a run keeps its work by default
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
    report_to: str | list[str] = field(default="none", metadata={"help": (
        "experiment trackers (Accelerate's): none, all, or one or more of " + ", ".join(TRACKERS)
        + "; the run's log.jsonl is always written"),
        "default": "none"})  # HfArgumentParser keeps a list field's default only from here
    logging_dir: str | None = field(default=None, metadata={"help": "where file-based trackers (tensorboard) "
                                                                    "write; default: OUTPUT_DIR/logs"})
    ema_decay: float | None = field(default=None, metadata={"help": (
        "keep an exponential moving average of the weights (e.g. 0.9999), updated after every optimizer step "
        "and saved as the model (OUTPUT_DIR/model; the trained weights go to model-raw); 0 or unset: off")})
    eval_ema: bool = field(default=True, metadata={"help": (
        "with ema_decay: evaluate the EMA weights beside the trained ones (ema_* in log.jsonl) and draw the "
        "sample grids from them")})

    _LOW = {"max_steps": 1, "per_device_batch_size": 1, "gradient_accumulation_steps": 1, "warmup_steps": 0,
            "seed": 0, "eval_every": 0, "eval_batch_size": 1, "save_every": 0, "save_total_limit": 1,
            "sample_every": 0, "samples_per_class": 1, "log_every": 1, "num_workers": 0}

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        for name, low in self._LOW.items():
            check_int(name, getattr(self, name), low=low)
        check_float("learning_rate", self.learning_rate, low=0.0, low_open=True)
        check_float("min_lr_ratio", self.min_lr_ratio, low=0.0, high=1.0)
        check_float("weight_decay", self.weight_decay, low=0.0)
        check_float("adam_epsilon", self.adam_epsilon, low=0.0, low_open=True)
        check_float("sample_temperature", self.sample_temperature, low=0.0)
        if not isinstance(self.adam_betas, (tuple, list)) or len(self.adam_betas) != 2:
            raise ValueError(f"adam_betas must be two floats in [0, 1), got {self.adam_betas!r}")
        self.adam_betas = tuple(check_float("adam_betas", b, 0.0, 1.0, high_open=True) for b in self.adam_betas)
        if self.max_grad_norm is not None:
            check_float("max_grad_norm", self.max_grad_norm, low=0.0, low_open=True)
        if self.sample_guidance_scale is not None:
            check_float("sample_guidance_scale", self.sample_guidance_scale, low=0.0)
        if isinstance(self.init_from, os.PathLike):
            self.init_from = str(self.init_from)
        for name in ("init_from", "init_revision", "torch_compile_backend"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{name} must be a non-empty str or None, got {value!r}")
        if self.init_revision is not None and self.init_from is None:
            raise ValueError(f"init_revision {self.init_revision!r} needs init_from (the Hub model of that revision)")
        if self.mixed_precision is not None:
            check_choice("mixed_precision (fp32 is 'no'; None: what `accelerate launch` says)",
                         self.mixed_precision, MIXED_PRECISION)
        self.report_to = _trackers(self.report_to)
        if self.logging_dir is not None:
            self.logging_dir = str(check_path("logging_dir", self.logging_dir))
        if self.ema_decay is not None:
            check_float("ema_decay", self.ema_decay, low=0.0, high=1.0, high_open=True)
            self.ema_decay = float(self.ema_decay) or None  # 0 is off, recorded as None
        if not isinstance(self.eval_ema, bool):
            raise TypeError(f"eval_ema must be a bool, got {type(self.eval_ema).__name__} {self.eval_ema!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["output_dir"] = str(self.output_dir)
        d["adam_betas"] = list(self.adam_betas)
        return d


@dataclass
class TrainResult:
    """What ``train`` leaves behind."""

    output_dir: Path
    model_dir: Path  # save_pretrained folder of the final model (the EMA weights when ema_decay is set)
    step: int
    resumed_from: Path | None
    eval_history: list[dict[str, float]] = field(default_factory=list)  # log.jsonl's evaluation records
    samples_png: Path | None = None
    raw_model_dir: Path | None = None  # with ema_decay: the trained (not averaged) weights
    loss_png: Path | None = None  # the loss curves (None without matplotlib)

    @property
    def final_eval(self) -> dict[str, float] | None:
        """The last evaluation of the weights in ``model_dir`` (the EMA's when they are the model; None
        when they were not evaluated)."""
        last = self.eval_history[-1] if self.eval_history else None
        return runs.metrics_of(last, ema=self.raw_model_dir is not None)


def _trackers(value: object) -> list[str]:
    """``report_to`` as a list of tracker names: "none" (or nothing) is [], "all" stays "all"; a name, a
    comma-separated string or a list, as transformers' Trainer takes it."""
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"report_to must be a tracker name or a list of them, got {value!r}")
    names = [n.strip().lower() for n in names if n.strip()]
    if names in ([], ["none"]):
        return []
    for name in names:
        check_choice("report_to", name, ("none", "all", *TRACKERS))
    if ("none" in names or "all" in names) and len(names) > 1:
        raise ValueError(f"report_to: 'none' and 'all' stand alone, got {names}")
    return list(dict.fromkeys(names))


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices (weights and embeddings, dim >= 2), none on biases and norms.

    Every trainable parameter lands in exactly one group; a tied weight, shared by two modules,
    counts once.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]  # parameters() yields a tied weight once
    decay, no_decay = [p for p in trainable if p.dim() >= 2], [p for p in trainable if p.dim() < 2]
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
        self.num_samples, self.batch_size, self.num_processes = num_samples, batch_size, num_processes
        self.process_index, self.seed = process_index, seed
        self.global_batch = batch_size * num_processes
        if num_samples < self.global_batch:
            raise ValueError(
                f"the training set has {num_samples} samples, fewer than one global batch "
                f"(per_device_batch_size {batch_size} x {num_processes} processes = {self.global_batch}); "
                "lower per_device_batch_size"
            )
        self.epoch, self.start = 0, 0

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
        return iter(DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=self.num_workers,
                               generator=torch.Generator().manual_seed(self.seed)))

    def next(self) -> dict[str, torch.Tensor]:
        try:
            batch = next(self._batches)
        except StopIteration:
            self.epoch, self.position = self.epoch + 1, 0
            self._batches = self._open()
            batch = next(self._batches)
        self.position += self.sampler.global_batch
        return batch


def check_compatible(config: GPTConfig, codebook_size: int, grid_shape: Sequence[int], num_classes: int,
                     where: str = "the dataset") -> None:
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


def config_for(
    dataset: Any, *, dropout: float = 0.0, class_conditional: bool | None = None, **kwargs: Any
) -> GPTConfig:
    """A ``GPTConfig`` sized for a code dataset (``CodeDataset``): vocabulary, sequence length and
    classes from its metadata (class-conditional when it has classes, unless told otherwise);
    ``dropout`` sets the embedding and residual dropout; ``kwargs`` go to ``GPTConfig``."""
    conditional = dataset.num_classes > 0 if class_conditional is None else class_conditional
    return GPTConfig(
        vocab_size=dataset.vocab_size, seq_len=dataset.seq_len, class_conditional=conditional,
        num_classes=dataset.num_classes if conditional else 0, embd_dropout=dropout, resid_dropout=dropout, **kwargs
    )


def make_accelerator(args: TrainingArguments) -> Accelerator:
    """The ``Accelerator`` that ``train`` makes from ``args``.

    Make it yourself, first thing, when a script needs the process group before training (e.g. to
    let the main process write the data while the others wait) and pass it to ``train``: Accelerate
    keeps one state per process, and the first object to create it decides its settings.
    """
    trackers = {}
    if args.report_to:  # only then: project_dir would otherwise change nothing but where Accelerate logs
        trackers = {"log_with": args.report_to, "project_dir": str(logging_dir(args))}
    return Accelerator(
        **trackers,
        # Without this, Accelerate on a machine with no accelerator treats the processes that
        # torchrun (`accelerate launch --multi_gpu`) starts as unrelated single processes; with it
        # they form one gloo process group. Where an accelerator exists, Accelerate picks it.
        cpu=resolve_device("auto").type == "cpu",
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        # The schedule is defined in optimizer steps; by default Accelerate would step it once per
        # process per update.
        step_scheduler_with_optimizer=False,
    )


def logging_dir(args: TrainingArguments) -> Path:
    """Where file-based trackers write: ``args.logging_dir``, else ``output_dir/logs``."""
    return Path(args.logging_dir) if args.logging_dir is not None else Path(args.output_dir) / runs.LOGS_DIR


def make_ema(model: torch.nn.Module, decay: float) -> AveragedModel:
    """The exponential moving average of ``model``'s weights that training keeps: torch's ``AveragedModel``, an
    fp32 copy updated with ``ema.update_parameters(model)`` after each optimizer step (the first update copies
    the weights; each later one moves the average ``1 - decay`` of the way to them)."""
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay)).float()
    return ema.requires_grad_(False)


def _on_main(accelerator: Accelerator, fn: Callable[[], Any]) -> Any:
    """``fn()`` on the main process only; every process gets its result, or raises the error it raised
    (so that the others never wait at a barrier for a process that has given up)."""
    outcome: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            outcome = [("ok", fn())]
        except (OSError, ValueError, TypeError) as err:
            if accelerator.num_processes == 1:
                raise
            outcome = [(type(err), str(err))]
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome)
    kind, value = outcome[0]
    if kind != "ok":
        raise kind(value)
    return value


def _write_failed(err: OSError, what: str) -> OSError:
    """A disk-full or read-only error as one sentence that names what was being written."""
    where = f" ({err.filename})" if err.filename else ""
    return OSError(err.errno, f"could not write {what}{where}: {err.strerror or err}")


def _take_lock(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {out} is a file, not a folder")
    try:
        return runs.acquire_lock(out)
    except FileExistsError:
        raise
    except OSError as err:
        raise _write_failed(err, f"the output folder {out}") from None


def _remove_run(out: Path) -> None:
    """Delete what a run wrote into ``out`` (and nothing else: the folder may hold the user's files)."""
    for name in (runs.CHECKPOINTS_DIR, runs.MODEL_DIR, runs.RAW_MODEL_DIR, runs.LOGS_DIR):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in (runs.TRAINING_ARGS, runs.STARTS, runs.RUN_DATA, runs.LOG, runs.SAMPLES, runs.LOSS_PLOT):
        (out / name).unlink(missing_ok=True)
    for sample in out.glob("samples-step-*.png"):
        sample.unlink(missing_ok=True)


def _find_start(args: TrainingArguments, num_items: int, say: Callable[[str], None]) -> Path | None:
    """Main process: clean up after a kill, then decide where to start: the newest checkpoint that can be
    restored exactly (resume), or nothing. Refuses to train over a run unless told to."""
    out = Path(args.output_dir)
    for done in runs.remove_partial_checkpoints(out):
        say(f"cleaned up after an interrupted run: {done}")
    folders = runs.checkpoint_folders(out)
    finished = (out / runs.MODEL_DIR).is_dir()
    if not args.resume:
        if folders or finished:
            if not args.overwrite_output_dir:
                held = f"checkpoints (newest {folders[-1][1].name})" if folders else "a finished run (model/)"
                raise ValueError(
                    f"output_dir {out} already holds {held}; pass resume=True (--resume) to continue that run, "
                    "overwrite_output_dir=True (--overwrite-output-dir) to delete it and start over, or choose "
                    "another output_dir"
                )
            _remove_run(out)
        return None
    problems = []
    for _, folder in reversed(folders):  # the newest that checks out, hashes included
        problem = runs.checkpoint_problem(folder, hashes=True, num_items=num_items)
        if problem is None:
            for skipped in problems:
                say(f"warning: skipping a checkpoint that cannot be restored exactly: {skipped}")
            return folder
        problems.append(problem)
    if problems:
        raise ValueError(f"resume: no checkpoint in {out / runs.CHECKPOINTS_DIR} can be restored exactly: "
                         + "; ".join(problems))
    if finished:
        raise ValueError(
            f"resume: output_dir {out} holds a finished model but no checkpoint to continue from (it was trained "
            "with save_every=0); pass overwrite_output_dir=True (--overwrite-output-dir) to start over, or "
            "choose another output_dir"
        )
    say(f"resume: no checkpoint in {out / runs.CHECKPOINTS_DIR}; starting from step 0")
    return None


def data_identity(dataset: Dataset) -> dict[str, Any]:
    """What identifies a training set, for a resume to compare: its size, and for a ``codegpt.data``
    dataset (or a ``Subset`` of one, e.g. a split) its codebook size, grid, classes, the SHA-256 of its
    shards (as ``dataset.json`` records them, else read now) and of the split's indices."""
    identity: dict[str, Any] = {"num_items": len(dataset)}
    base, indices = dataset, None
    while isinstance(base, torch.utils.data.Subset):  # a subset of a subset: compose the indices
        indices = list(base.indices) if indices is None else [base.indices[i] for i in indices]
        base = base.dataset
    if indices is not None:
        identity["indices_sha256"] = hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()
    folder = getattr(base, "path", None)
    if folder is not None and (Path(folder) / "dataset.json").is_file():
        meta = read_json(Path(folder) / "dataset.json", "the training data")
        shards = hashlib.sha256()
        for shard in meta.get("shards", []):
            shards.update(str(shard.get("sha256") or file_record(Path(folder) / shard["file"])["sha256"]).encode())
        identity.update(dataset_items=len(base), codebook_size=meta.get("codebook_size"), grid=meta.get("grid"),
                        num_classes=meta.get("num_classes"), shards_sha256=shards.hexdigest())
    return identity


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``field: old -> new`` for every field both record with different values."""
    return [f"{prefix}{key}: {old[key]!r} -> {new[key]!r}" for key in new if key in old and old[key] != new[key]]


def _check_resume(args: TrainingArguments, run_args: dict[str, Any], resume_from: Path, model: GPTConfig | None,
                  identity: dict[str, Any]) -> dict[str, Any]:
    """Main process: refuse a resume that would change the run, naming every difference at once; return the
    history record of this start (with the arguments that changed, which may)."""
    out = Path(args.output_dir)
    step = runs.read_trainer_state(resume_from)["step"]
    if args.max_steps <= step:
        raise ValueError(f"max_steps {args.max_steps} (--steps): the run in {out} is already at step {step} "
                         f"({resume_from.name}); pass a larger max_steps to train on")
    starts = runs.read_starts(out)
    previous = starts[-1] if starts else {}
    if "args" not in previous and (out / runs.TRAINING_ARGS).is_file():  # a run from before starts.jsonl
        previous = {"args": read_json(out / runs.TRAINING_ARGS, "output_dir")}
    old_args = {k: v for k, v in previous.get("args", {}).items() if k not in _HOW_STARTED}
    if args.init_from is None:  # the checkpoint holds the fine-tuned weights: its source stays on record
        run_args.update({k: v for k, v in old_args.items() if k.startswith("init_")})
    else:  # the same source given again: what it resolved to at the start stays on record
        run_args.update({k: v for k, v in old_args.items() if k.startswith("init_") and k not in run_args})
    fixed = {k: v for k, v in run_args.items() if k not in RESUMABLE | _HOW_STARTED}
    problems = _differences(old_args, fixed)
    if model is not None:
        saved = GPTConfig.from_pretrained(resume_from / runs.MODEL_DIR)
        problems += _differences({k: getattr(saved, k) for k in _MODEL_FIELDS},
                                 {k: getattr(model, k) for k in _MODEL_FIELDS}, "model ")
    problems += _differences(previous.get("data") or {}, identity, "data ")
    if problems:
        raise ValueError(
            f"resume: the run in {out} cannot go on with other settings (they decide its weights): "
            + "; ".join(problems) + f". A resume may change only {', '.join(sorted(RESUMABLE))}; use another "
            "output_dir for a new run, or leave the model flags out (--resume takes the checkpoint's model)"
        )
    changed = {k: [old_args[k], v] for k, v in run_args.items()
               if k in RESUMABLE and k in old_args and old_args[k] != v}
    return {"step": step, "resumed_from": resume_from.name, "changed": changed}


def _init_model(args: TrainingArguments, accelerator: Accelerator, given: GPT | GPTConfig | None
                ) -> tuple[GPT, dict[str, Any]]:
    """The first weights of a fine-tuning run: those of ``args.init_from`` (at ``init_revision``), in fp32, with
    its config, or with ``given``'s when that differs only in dropout. Returns the model and what to record
    of the source: the local model folder, or the Hub commit."""
    if isinstance(given, GPT):
        raise ValueError(f"init_from {args.init_from!r} gives the first weights, and so does the GPT passed as model; "
                         "pass model=None (or a GPTConfig to change dropout)")

    def resolve() -> tuple[str, dict[str, Any]]:  # main process first: a download, and errors named once
        run = runs.resolve_run(args.init_from, "init_from", revision=args.init_revision)
        if run.hub is not None:
            return str(run.model_dir), {"init_from_commit": run.hub["commit"]}
        return str(run.model_dir), {"init_from_dir": str(run.model_dir.resolve())}

    model_dir, source = _on_main(accelerator, resolve)
    model = runs.load_model(model_dir, device="cpu", dtype=torch.float32, what="init_from")
    if given is not None:
        differ = [d for d in _differences({k: getattr(model.config, k) for k in _MODEL_FIELDS},
                                          {k: getattr(given, k) for k in _MODEL_FIELDS})
                  if d.split(":")[0] not in _DROPOUT_FIELDS]
        if differ:
            raise ValueError(f"init_from {args.init_from}: the model config given differs from the source's in "
                             f"{'; '.join(differ)}; only dropout may change when fine-tuning (or pass model=None)")
        weights = model.state_dict()
        model = GPT(given)
        model.load_state_dict(weights)
    return model, source


def _adam_fused(asked: bool | None, device: torch.device) -> bool | None:
    """AdamW's ``fused`` for ``device``: the fused kernel where asked for or (None) where the device has one
    (CUDA and ROCm, and the CPU since torch 2.4), else None (torch's default, foreach)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    supported = device.type in _get_fused_kernels_supported_devices()
    if asked and not supported:
        raise ValueError(f"adam_fused: torch {torch.__version__} has no fused AdamW on {device.type}; "
                         "leave adam_fused unset (None) or False")
    return True if (asked or (asked is None and supported)) else None


def _set_checkpointing(model: GPT, on: bool) -> None:
    """Gradient (activation) checkpointing on every block, through transformers' API of this version."""
    if on:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    else:
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()


def _check_rng_restored(checkpoint: Path, process_index: int) -> None:
    """Accelerate's load_state only logs a random state it could not load; a resume that goes on from
    another RNG state is not exact. Compare the live generators with the file's."""
    file = checkpoint / f"random_states_{process_index}.pkl"
    try:
        states = load_accelerate_file(file)
        restored = (torch.equal(torch.get_rng_state(), states["torch_manual_seed"])
                    and random.getstate() == states["random_state"])
        if torch.cuda.is_available() and "torch_cuda_manual_seed" in states:
            restored = restored and all(torch.equal(a, b) for a, b in
                                        zip(torch.cuda.get_rng_state_all(), states["torch_cuda_manual_seed"],
                                            strict=True))
    except Exception as err:  # a damaged or foreign file fails in many ways
        raise ValueError(f"checkpoint {checkpoint}: the random state {file.name} cannot be restored ({err})") from None
    if not restored:
        raise ValueError(f"checkpoint {checkpoint}: the random state {file.name} was not restored")


def _tracker_config(run_args: dict[str, Any]) -> dict[str, Any]:
    """The run's arguments as trackers store hyperparameters: numbers, strings and booleans (lists as text)."""
    flat = jsonable(run_args)
    return {k: v if v is None or isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in flat.items()}


def _base_dataset(dataset: Dataset) -> Dataset:
    """The dataset under any ``Subset``s (a codegpt.data.CodeDataset knows its grid, codebook and classes)."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return dataset


def _grid_shape(config: GPTConfig, dataset: Dataset, grid_shape: tuple[int, int] | None) -> tuple[int, int]:
    """The code grid: given, else the dataset's (checked against the model), else square, else one row."""
    base = _base_dataset(dataset)
    data_grid = getattr(base, "grid", None)  # a codegpt.data.CodeDataset knows its grid, codebook and classes
    if data_grid is not None:
        data_grid = (int(data_grid[0]), int(data_grid[1]))
        if getattr(base, "codebook_size", None) is not None:
            check_compatible(config, base.codebook_size, data_grid, getattr(base, "num_classes", None) or 0)
    grid_shape = grid_shape or data_grid
    if grid_shape is None:
        side = math.isqrt(config.seq_len)
        grid_shape = (side, side) if side * side == config.seq_len else (1, config.seq_len)
    if grid_shape[0] * grid_shape[1] != config.seq_len:
        raise ValueError(f"grid_shape {tuple(grid_shape)} must hold seq_len={config.seq_len} codes")
    return grid_shape


class _Loop:
    """A run between optimizer steps: where it is (step, data position, evaluations so far) and what
    it does at each step (update, log, evaluate, sample, save)."""

    def __init__(self, args: TrainingArguments, accelerator: Accelerator, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                 data: _DataStream, eval_dataset: Dataset | None, step: int, eval_history: list[dict[str, float]],
                 global_batch: int, grid_shape: tuple[int, int], decode: Decoder | None,
                 ema: AveragedModel | None = None, log_window: dict[str, Any] | None = None) -> None:
        self.args, self.accelerator, self.model = args, accelerator, model
        self.optimizer, self.scheduler, self.data, self.eval_dataset = optimizer, scheduler, data, eval_dataset
        self.step, self.start_step, self.eval_history, self.global_batch = step, step, eval_history, global_batch
        self.grid_shape, self.decode, self.ema = grid_shape, decode, ema
        self.out = Path(args.output_dir)
        # The training step's forward (and so its backward) compiled; evaluation, sampling and saving use the
        # plain module (other shapes, and a KV cache, would recompile it).
        self.step_model = (torch.compile(model, backend=args.torch_compile_backend or "inductor")
                           if args.torch_compile else model)
        # The training log's current window (steps since the last record): sums on this process's device. A
        # checkpoint saves them, so that a resumed run logs the same records as an uninterrupted one.
        window = log_window or {"loss": 0.0, "grad_norm": 0.0, "steps": 0}
        device = accelerator.device
        self.window_loss = torch.tensor(window["loss"], dtype=torch.float32, device=device)
        self.window_grad_norm = torch.tensor(window["grad_norm"], dtype=torch.float32, device=device)
        self.window_steps = window["steps"]
        self.grad_norm = torch.zeros((), device=device)  # of the last update, before clipping
        self.noted_no_plot, self.loss_png = False, None
        self.bar = tqdm(total=args.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
                        disable=not (args.progress and accelerator.is_main_process))

    def optimizer_step(self) -> torch.Tensor:
        """One update: ``gradient_accumulation_steps`` micro-batches, then clipping, AdamW and the
        schedule. Returns the mean micro-batch loss (detached)."""
        accelerator, model, device = self.accelerator, self.model, self.accelerator.device
        model.train()
        conditional = accelerator.unwrap_model(model).config.class_conditional
        total = torch.zeros((), device=device)
        for _ in range(self.args.gradient_accumulation_steps):
            batch = self.data.next()
            with accelerator.accumulate(model):  # no gradient sync across processes until the last
                loss = self.step_model(
                    input_ids=batch["input_ids"].to(device),
                    labels=batch["labels"].to(device),
                    classes=batch["classes"].to(device) if conditional else None,
                    use_cache=False,
                ).loss
                accelerator.backward(loss)  # scaled by 1 / gradient_accumulation_steps
                if accelerator.sync_gradients:  # an infinite bound measures the norm and clips nothing
                    norm = accelerator.clip_grad_norm_(model.parameters(), self.args.max_grad_norm or math.inf)
                    if norm is not None:  # DeepSpeed clips itself; under FSDP2 the norm is a DTensor (sharded)
                        self.grad_norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
                self.optimizer.step()  # a no-op until the last micro-batch
                if accelerator.sync_gradients:
                    self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            total += loss.detach().float()
        return total / self.args.gradient_accumulation_steps

    @property
    def sampled_module(self) -> torch.nn.Module:
        """The weights the sample grids come from: the EMA's when they are evaluated, else the trained ones."""
        if self.ema is not None and self.args.eval_ema:
            return self.ema.module
        return self.accelerator.unwrap_model(self.model)

    def log_training(self) -> None:
        """One training record over the steps since the last: mean loss and gradient norm, the learning rate
        of the next step, codes (tokens) per second; to log.jsonl and the trackers."""
        accelerator, steps = self.accelerator, self.window_steps
        loss = self.window_loss if accelerator.num_processes == 1 else accelerator.reduce(self.window_loss, "mean")
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        record = {"step": self.step, "loss": float(loss) / steps, "learning_rate": self.scheduler.get_last_lr()[0],
                  "grad_norm": float(self.window_grad_norm) / steps,
                  "tokens_per_second": steps * self.codes_per_step / elapsed}
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['learning_rate']:.2e}",
                             tok_s=f"{record['tokens_per_second']:,.0f}")
        if accelerator.is_main_process:
            runs.append_log(self.out, record)
        accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=self.step)
        self.window_loss.zero_()
        self.window_grad_norm.zero_()
        self.window_steps, self.window_start = 0, time.perf_counter()

    def evaluate(self) -> None:
        """Held-out loss of the trained weights (and of the EMA's, as ``ema_*``), to log.jsonl and the trackers;
        then the loss curves."""
        if self.eval_dataset is None:
            return
        args, accelerator = self.args, self.accelerator
        metrics = {"step": self.step, **evaluate(self.model, self.eval_dataset, accelerator, args.eval_batch_size)}
        if self.ema is not None and args.eval_ema:
            averaged = evaluate(self.ema.module, self.eval_dataset, accelerator, args.eval_batch_size)
            metrics.update({f"{runs.EMA_PREFIX}{k}": v for k, v in averaged.items()})
        self.eval_history.append(metrics)
        accelerator.log({f"eval/{k}": v for k, v in metrics.items() if k != "step" and not k.endswith("num_codes")},
                        step=self.step)
        if accelerator.is_main_process:
            runs.append_log(self.out, metrics)
            ema = (f"; EMA {metrics['ema_loss_nats']:.4f} nats, {metrics['ema_bits_per_code']:.4f} bits per code"
                   if "ema_loss_nats" in metrics else "")
            self.bar.write(f"step {self.step}: held-out {metrics['loss_nats']:.4f} nats, "
                           f"{metrics['bits_per_code']:.4f} bits per code{ema}")
            self.plot()

    def plot(self) -> Path | None:
        """Main process: draw ``loss.png`` from the log (once told when matplotlib is missing)."""
        try:
            return runs.plot_losses(self.out)
        except ImportError:
            if not self.noted_no_plot:
                self.bar.write("note: no loss.png (matplotlib is not installed: pip install 'codegpt[plots]')")
                self.noted_no_plot = True
            return None

    def save(self) -> None:
        """Write ``checkpoints/step-N`` (model, Accelerate state, trainer state, the manifest last), keep the
        newest few. A failed write (disk full, read-only) removes the partial save and leaves the older
        checkpoints as they were."""
        accelerator = self.accelerator
        final = self.out / runs.CHECKPOINTS_DIR / runs.checkpoint_name(self.step)
        tmp = final.with_name(final.name + ".tmp")

        def failed(err: OSError) -> OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # frees the space the older checkpoints do not need
            return _write_failed(err, f"checkpoint {final.name} in {final.parent} (the older checkpoints are "
                                      "intact; free space or fix permissions, then resume)")

        def begin() -> None:
            try:
                shutil.rmtree(tmp, ignore_errors=True)  # left over from a kill mid-save
                tmp.mkdir(parents=True)
            except OSError as err:
                raise failed(err) from None

        def finish() -> None:
            try:
                # The checkpoint's model/ is the model a user samples: the EMA weights when there are some (the
                # trained ones are Accelerate's model.safetensors beside it), which a resume restores from.
                shown = self.ema.module if self.ema is not None else accelerator.unwrap_model(self.model)
                shown.save_pretrained(tmp / runs.MODEL_DIR)
                state = {"step": self.step, "epoch": self.data.epoch, "position": self.data.position,
                         "global_batch": self.global_batch, "num_processes": accelerator.num_processes,
                         "eval_history": self.eval_history, "log_window": log_window}
                if self.ema is not None:
                    state["ema_updates"] = int(self.ema.n_averaged)
                write_json(tmp / runs.STATE, state)
                runs.write_manifest(tmp)  # last: it makes the checkpoint complete
                replace_dir(tmp, final)
            except OSError as err:
                raise failed(err) from None
            for _, old in runs.complete_checkpoints(self.out)[:-self.args.save_total_limit]:
                # Renamed first: a kill mid-delete leaves a `.deleting` folder the next start removes,
                # never a half-deleted checkpoint.
                doomed = old.with_name(old.name + ".deleting")
                os.replace(old, doomed)
                shutil.rmtree(doomed, ignore_errors=True)

        # This process's log window, as every process's mean: the record a resumed run logs is the same.
        window_loss = self.window_loss if accelerator.num_processes == 1 else accelerator.reduce(self.window_loss,
                                                                                                "mean")
        log_window = {"loss": float(window_loss), "grad_norm": float(self.window_grad_norm),
                      "steps": self.window_steps}
        _on_main(accelerator, begin)
        try:
            accelerator.save_state(str(tmp))  # every process writes its RNG state; main writes the rest
        except OSError as err:
            raise failed(err) from None
        accelerator.wait_for_everyone()
        _on_main(accelerator, finish)

    def write_samples(self, path: Path) -> Path | None:
        """Sample a grid on the main process (one row per class); the others wait. The sampler seeds a
        generator of its own, so the training RNG stream is the same with or without samples."""
        written, args = None, self.args
        if self.accelerator.is_main_process:
            module = self.sampled_module
            with self.accelerator.autocast():
                codes, classes = runs.sample_classes(
                    module, args.samples_per_class, guidance_scale=args.sample_guidance_scale,
                    temperature=args.sample_temperature, seed=args.seed,
                )
            images = runs.render_codes(codes, self.grid_shape, self.decode, module.config.codebook_size)
            rows = module.config.num_classes if classes is not None else 1
            names = getattr(_base_dataset(self.data.dataset), "class_names", None)  # as `codegpt sample` labels
            written = runs.save_image_grid(images, path, rows=rows,
                                           row_labels=names if classes is not None and names else None)
            self.log_image(written)
        self.accelerator.wait_for_everyone()
        return written

    def log_image(self, path: Path) -> None:
        """Main process: the sample grid to every tracker that takes images."""
        trackers = [t for t in self.accelerator.trackers if hasattr(t, "log_images")]
        if not trackers:
            return
        from PIL import Image

        with Image.open(path) as picture:
            grid = np.asarray(picture.convert("RGB"))  # (H, W, 3) uint8, the PNG as written
        for tracker in trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"samples": grid[None]}, step=self.step, dataformats="NHWC")
            else:
                tracker.log_images({"samples": [grid]}, step=self.step)

    def run(self) -> None:
        """Step until ``max_steps``, then evaluate and save the last step if not done yet."""
        args, accelerator = self.args, self.accelerator
        self.codes_per_step = self.global_batch * accelerator.unwrap_model(self.model).config.seq_len
        self.window_start = time.perf_counter()
        while self.step < args.max_steps:
            self.window_loss += self.optimizer_step()
            self.window_grad_norm += self.grad_norm.float()
            if self.ema is not None:  # after the update: the average of the weights each step ends with
                self.ema.update_parameters(accelerator.unwrap_model(self.model))
            self.step += 1
            self.window_steps += 1
            self.bar.update(1)
            step, last = self.step, self.step == args.max_steps
            if step % args.log_every == 0 or last:
                self.log_training()
            if args.eval_every and step % args.eval_every == 0 and not last:
                self.evaluate()
            if args.sample_every and step % args.sample_every == 0 and not last:
                self.write_samples(self.out / f"samples-step-{step:06d}.png")
            # Last in the step: the RNG state saved here is the one the next step starts from.
            if args.save_every and step % args.save_every == 0 and not last:
                self.save()
        self.bar.close()
        if not self.eval_history or self.eval_history[-1]["step"] != self.step:
            self.evaluate()
        if args.save_every and self.step > self.start_step:  # not when a finished run is resumed
            self.save()
        if accelerator.is_main_process:
            self.loss_png = self.plot()


def train(
    args: TrainingArguments,
    model: GPT | GPTConfig | None,
    train_dataset: Dataset,
    eval_dataset: Dataset | None = None,
    *,
    decode: Decoder | None = None,
    grid_shape: tuple[int, int] | None = None,
    accelerator: Accelerator | None = None,
    data_record: dict[str, Any] | None = None,
) -> TrainResult:
    """Train a GPT prior on a code dataset and return where the results are.

    ``model`` is a ``GPT``, or a ``GPTConfig`` built after seeding (initial weights depend on
    ``args.seed`` only), or None to resume with the checkpoint's own config; a resume with a given
    model refuses one whose config differs from the checkpoint's. With ``args.init_from`` (fine-tuning) the
    first weights and config are the source's (``model`` None, or a ``GPTConfig`` that differs in dropout
    only); a resume from a checkpoint wins over it (the checkpoint holds the fine-tuned weights) and refuses
    another source than the run's. The datasets yield ``codegpt.data``
    items; ``eval_dataset`` is scored every ``eval_every`` steps and at the end. ``decode`` turns codes
    (B, H, W) into images in [0, 1] for the sample grid (default: one coloured cell per code);
    ``grid_shape`` defaults to the dataset's, else square, else one row; ``accelerator`` defaults to
    ``make_accelerator(args)``. ``data_record`` (JSON-able: the data, codebook and autoencoder the codes
    decode through, see ``runs.RUN_DATA``) is written into the run folder at the start, so the run's
    samples and evaluation need no flags.

    Errors, raised before the first step and before anything is written: ``FileExistsError`` when
    another run holds the folder's lock; ``ValueError`` for a folder that holds a run (unless
    ``resume`` or ``overwrite_output_dir``), a resume with nothing restorable, a ``max_steps`` the
    checkpoint has reached, or settings that differ from the run's (all of them listed); ``OSError``
    naming what could not be written (disk full, read-only), the older checkpoints left intact.
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
    elif args.report_to and not accelerator.log_with:
        raise ValueError(f"report_to {args.report_to}: the accelerator was made without trackers "
                         "(make it with make_accelerator(args))")
    if model is not None and not isinstance(model, (GPT, GPTConfig)):
        raise TypeError(f"model must be a GPT, a GPTConfig or None (resume: the checkpoint's), got "
                        f"{type(model).__name__}")
    out = Path(args.output_dir)
    lock = _on_main(accelerator, lambda: _take_lock(out))
    try:
        return _train(args, accelerator, model, train_dataset, eval_dataset, decode, grid_shape, data_record)
    finally:
        if accelerator.is_main_process:
            runs.release_lock(lock)


def _train(args: TrainingArguments, accelerator: Accelerator, model: GPT | GPTConfig | None, train_dataset: Dataset,
           eval_dataset: Dataset | None, decode: Decoder | None, grid_shape: tuple[int, int] | None,
           data_record: dict[str, Any] | None) -> TrainResult:
    """``train`` once the run folder is this process's (locked)."""
    out = Path(args.output_dir)
    # mixed_precision=None means what Accelerate is configured with: record what it chose.
    run_args = {**args.to_dict(), "mixed_precision": accelerator.mixed_precision}
    given = model.config if isinstance(model, GPT) else model

    def plan() -> tuple[Path | None, dict[str, Any]]:
        """Where to start, and the record of this start; every check before anything is written."""
        resume_from = _find_start(args, len(train_dataset), accelerator.print)
        identity = data_identity(train_dataset)
        if resume_from is None:
            return None, {"step": 0, "resumed_from": None, "data": identity}
        return resume_from, {**_check_resume(args, run_args, resume_from, given, identity), "data": identity}

    resume_from, start = _on_main(accelerator, plan)
    state = None
    if resume_from is not None:
        state = runs.read_trainer_state(resume_from, len(train_dataset))
        if state["num_processes"] != accelerator.num_processes:
            raise ValueError(f"resume: {resume_from.name} was saved by {state['num_processes']} processes, this run "
                             f"has {accelerator.num_processes}; each keeps its own random state, so the resume "
                             f"would not be exact: launch {state['num_processes']} processes")
        if model is None:  # the checkpoint's own model, whatever the flags say
            model = GPTConfig.from_pretrained(resume_from / runs.MODEL_DIR)
    elif args.init_from is not None:
        model, source = _init_model(args, accelerator, model)
        run_args.update(source)  # recorded: the card says what the run was fine-tuned from
    elif model is None:
        raise ValueError(f"model: None stands for the checkpoint's model, and {out} has no checkpoint to resume "
                         "from; pass a GPT or a GPTConfig (or init_from)")

    set_seed(args.seed)  # identical initial weights on every process
    if isinstance(model, GPTConfig):
        model = GPT(model)
    try:
        grid_shape = _grid_shape(model.config, train_dataset, grid_shape)
    except ValueError as err:
        if resume_from is None and args.init_from is not None:
            raise ValueError(f"init_from {args.init_from}: {err}") from None
        raise
    model.train()
    if accelerator.device.type == "cpu":
        use_cpu_kernels(model)  # same parameters, same state dict; removed again at the end
    if args.gradient_checkpointing:
        _set_checkpointing(model, True)
    optimizer = torch.optim.AdamW(
        parameter_groups(model, args.weight_decay), lr=args.learning_rate, betas=args.adam_betas, eps=args.adam_epsilon,
        fused=_adam_fused(args.adam_fused, accelerator.device),
    )
    # A plain function: LambdaLR saves no state for one, so the scheduler's state_dict stays plain data
    # (and loads with weights_only=True).
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_lambda(step, args.warmup_steps, args.max_steps, args.min_lr_ratio)
    )
    # The average of the weights, in fp32 whatever the model computes in, on every process (each evaluates its
    # share); a copy made before `prepare` wraps (or compiles) the model.
    ema = make_ema(model, args.ema_decay).to(accelerator.device) if args.ema_decay is not None else None
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    sampler = EpochBatchSampler(
        len(train_dataset), args.per_device_batch_size, accelerator.num_processes, accelerator.process_index, args.seed
    )
    global_batch = sampler.global_batch * args.gradient_accumulation_steps
    step, epoch, position, eval_history = 0, 0, 0, []  # position: samples consumed in the epoch
    if resume_from is not None:  # model, optimizer, scheduler and every RNG, then where the data stopped
        try:
            accelerator.load_state(str(resume_from))
        except Exception as err:  # the manifest checked out, yet the state does not load (e.g. another torch)
            raise ValueError(f"checkpoint {resume_from} cannot be restored: {str(err).splitlines()[0]}") from None
        _check_rng_restored(resume_from, accelerator.process_index)
        step, epoch, position, eval_history = state["step"], state["epoch"], state["position"], state["eval_history"]
        if ema is not None:
            if "ema_updates" not in state:
                raise ValueError(f"resume: {resume_from} holds no EMA weights (its run was trained without "
                                 "ema_decay); resume without ema_decay, or start a new run")
            # The checkpoint's model/ holds the average; fp32 safetensors, so it comes back bit for bit.
            saved = runs.load_model(resume_from / runs.MODEL_DIR, device="cpu", what="checkpoint")
            ema.module.load_state_dict(saved.state_dict())
            ema.n_averaged.fill_(state["ema_updates"])
        accelerator.print(f"resumed from {resume_from} at step {step}")
    else:
        set_seed(args.seed, device_specific=True)  # different dropout on each process, same on every restart

    def record() -> None:
        try:
            if resume_from is None:  # a new run: its first arguments, kept for good
                write_json(out / runs.TRAINING_ARGS, run_args)
            when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            runs.record_start(out, {"time": when, **start, "args": run_args}, fresh=resume_from is None)
            if data_record is not None:
                write_json(out / runs.RUN_DATA, data_record)
            # The log holds this run's records up to where it starts: none, or the checkpoint's (a run killed
            # after a record but before its next checkpoint repeats that step): its evaluations, and the
            # training records the log holds up to its step.
            if resume_from is None:
                runs.write_log(out, [])
            else:
                trained = [r for r in runs.read_log(out) if not runs.is_eval_record(r) and r["step"] <= step]
                runs.write_log(out, runs.merge_log(trained, eval_history))
        except OSError as err:
            raise _write_failed(err, f"the run's records in {out}") from None

    _on_main(accelerator, record)
    if args.report_to:  # the main process's trackers (Accelerate starts none on the others)
        # A resume hides what tensorboard holds past the checkpoint, as log.jsonl drops it.
        accelerator.init_trackers(runs.TRACKER_PROJECT, config=_tracker_config(run_args),
                                  init_kwargs={"tensorboard": {"purge_step": step + 1}} if step else {})
    data = _DataStream(train_dataset, sampler, args.num_workers, args.seed, epoch, position)
    loop = _Loop(args, accelerator, model, optimizer, scheduler, data, eval_dataset, step, eval_history, global_batch,
                 grid_shape, decode, ema, state.get("log_window") if state is not None else None)
    loop.run()

    model_dir = out / runs.MODEL_DIR
    raw_dir = out / runs.RAW_MODEL_DIR if ema is not None else None

    def save_model(module: torch.nn.Module, folder: Path) -> None:
        tmp = folder.with_name(folder.name + ".tmp")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            module.save_pretrained(tmp)
            runs.write_manifest(tmp)
            replace_dir(tmp, folder)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise _write_failed(err, f"the final model {folder} (the checkpoints are intact)") from None

    # With EMA, model/ (what sample, eval, push and from_pretrained take) holds the average; written last, as
    # model/ marks a finished run.
    if ema is not None:
        _on_main(accelerator, lambda: save_model(accelerator.unwrap_model(model), raw_dir))
    _on_main(accelerator, lambda: save_model(ema.module if ema is not None else accelerator.unwrap_model(model),
                                             model_dir))
    samples = loop.write_samples(out / runs.SAMPLES)
    if args.report_to:
        accelerator.end_training()
    remove_cpu_kernels(accelerator.unwrap_model(model))  # the caller's model as it came, plain modules
    if args.gradient_checkpointing:
        _set_checkpointing(accelerator.unwrap_model(model), False)
    return TrainResult(out, model_dir, loop.step, resume_from, eval_history, samples, raw_dir, loop.loss_png)
