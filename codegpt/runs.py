"""A training run's folder: its layout, its checkpoints, its metrics, loading its model, its samples.

The one place that knows where things are in a run: training writes it; the CLI, evaluation and the
Hub push read it. The per-class sampler and image grid of ``samples.png`` live here too::

    run/
      training_args.json          the arguments of the run's first start, never rewritten by a resume
      starts.jsonl                one line per start: time, step, resumed from, arguments, data identity, changes
      data.json                   what the codes decode through: data, codebook and autoencoder (spec), split
      log.jsonl                   one line per training record (step, loss, learning_rate, grad_norm,
                                  tokens_per_second) and per evaluation (step, loss_nats, bits_per_code, num_codes,
                                  and ema_* for the EMA weights)
      loss.png                    training and held-out loss against step (with matplotlib)
      logs/                       the file-based trackers' (tensorboard) folder, with --report-to
      checkpoints/step-000500/    model/ (save_pretrained) + Accelerate state + trainer_state.json + manifest.json
      model/                      the final model (save_pretrained; loads with GPT.from_pretrained) + manifest.json
      model-raw/                  with ema_decay: the trained weights; model/ (and a checkpoint's model/) then
                                  holds their exponential moving average, the weights to sample and share
      samples.png                 a grid of samples at the end (one row per class)
      train.lock                  while a run trains into the folder: its pid and host

A checkpoint is written to ``step-XXXXXX.tmp`` and renamed into place; its ``manifest.json`` (every
file's size and SHA-256) is written last, so a folder whose manifest is missing or does not match
its files (a save cut short, a file damaged or replaced later) is never taken for a checkpoint.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError

from ._util import (
    atomic_write,
    check_file_records,
    check_format,
    check_int,
    check_path,
    file_record,
    read_json,
    resolve_device,
    write_json,
    write_text,
)
from .configuration_codegpt import GPTConfig
from .modeling_codegpt import GPT
from .sampling import generate

__all__ = [
    "MODEL_DIR", "CHECKPOINTS_DIR", "TRAINING_ARGS", "STARTS", "RUN_DATA", "LOG", "STATE", "MANIFEST", "SAMPLES",
    "LOCK", "checkpoint_name", "write_manifest", "check_manifest", "read_trainer_state", "checkpoint_problem",
    "checkpoint_folders", "complete_checkpoints", "newest_checkpoint", "remove_partial_checkpoints", "acquire_lock",
    "release_lock", "read_starts", "record_start", "read_training_args", "verify_run", "RunFiles", "resolve_run",
    "is_repo_id", "fetch_hub_model",
    "load_model", "read_metrics", "write_log", "append_log", "read_log", "merge_log", "is_eval_record", "metrics_of",
    "plot_losses", "RAW_MODEL_DIR", "LOSS_PLOT", "LOGS_DIR", "TRACKER_PROJECT", "EMA_PREFIX", "Decoder",
    "sample_classes", "render_codes", "save_image_grid",
]

MODEL_DIR = "model"
RAW_MODEL_DIR = "model-raw"  # with EMA: the trained weights, model/ holding their average
CHECKPOINTS_DIR = "checkpoints"
TRAINING_ARGS = "training_args.json"
STARTS = "starts.jsonl"
RUN_DATA = "data.json"  # {"data", "codebook" (absolute folders), "autoencoder" (a spec), "split"}
LOG = "log.jsonl"
LOSS_PLOT = "loss.png"
LOGS_DIR = "logs"  # the trackers' default logging_dir
TRACKER_PROJECT = "codegpt"  # the project name trackers get (tensorboard: logs/codegpt)
EMA_PREFIX = "ema_"  # an evaluation record's keys for the EMA weights
STATE = "trainer_state.json"
MANIFEST = "manifest.json"  # written last: every other file's size and SHA-256
SAMPLES = "samples.png"
LOCK = "train.lock"
CHECKPOINT_RE = re.compile(r"^step-(\d{6,})$")
MANIFEST_FORMAT, MANIFEST_VERSION = "codegpt-manifest", 1
# What a checkpoint must hold to be restored exactly (besides random_states_<rank>.pkl for every process).
CHECKPOINT_FILES = (STATE, "model.safetensors", "optimizer.bin", "scheduler.bin", f"{MODEL_DIR}/config.json",
                    f"{MODEL_DIR}/model.safetensors")
# Files the run folder's writers leave as `.NAME.<pid>-<hex>.tmp` when killed mid-write (_util.atomic_write).
_RUN_FILES = (TRAINING_ARGS, STARTS, RUN_DATA, LOG, SAMPLES, "samples-step-*.png", LOSS_PLOT)


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint at ``step``: ``step-000500``."""
    return f"step-{step:06d}"


def write_manifest(folder: str | os.PathLike) -> Path:
    """Write ``folder/manifest.json``: every file below ``folder`` (relative path -> size and SHA-256).
    Written last: a folder whose manifest is present and matches is complete."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): file_record(p)
             for p in sorted(folder.rglob("*")) if p.is_file() and p != folder / MANIFEST}
    return write_json(folder / MANIFEST, {"format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION,
                                          "files": files})


def check_manifest(folder: str | os.PathLike, what: str, hashes: bool = False, required: Sequence[str] = ()) -> None:
    """Raise ``ValueError`` naming the file unless ``folder``'s manifest lists every ``required`` file and every
    file it lists is there with its size (and, with ``hashes``, its SHA-256)."""
    folder = Path(folder)
    file = folder / MANIFEST
    if not file.is_file():
        raise ValueError(f"{what}: {str(folder)!r} has no {MANIFEST} (a save cut short, or written by a codegpt "
                         "older than manifests: its files cannot be checked)")
    meta = read_json(file, what)
    check_format(file, meta, MANIFEST_FORMAT, MANIFEST_VERSION)
    files = meta.get("files")
    if not isinstance(files, dict):
        raise ValueError(f"{what}: {str(file)!r} must map file names to records under 'files'")
    unlisted = [name for name in required if name not in files]
    if unlisted:
        raise ValueError(f"{what}: {str(folder)!r} lacks {', '.join(unlisted)} (not in its {MANIFEST})")
    check_file_records(folder, files, what, hashes=hashes)


def read_trainer_state(checkpoint: str | os.PathLike, num_items: int | None = None) -> dict[str, Any]:
    """A checkpoint's ``trainer_state.json``, every field checked (types and ranges; ``position`` at most
    ``num_items``, the training set's size, when given); errors name the file and the field."""
    file = Path(checkpoint) / STATE
    state = read_json(file, "checkpoint")
    try:
        step = check_int(f"{file}: field 'step'", state.get("step"), low=1)
        m = CHECKPOINT_RE.match(Path(checkpoint).name.removesuffix(".tmp"))
        if m and step != int(m.group(1)):
            raise ValueError(f"{file}: field 'step' is {step} but the folder is {Path(checkpoint).name}")
        check_int(f"{file}: field 'epoch'", state.get("epoch"), low=0)
        check_int(f"{file}: field 'position'", state.get("position"), low=0, high=num_items)
        check_int(f"{file}: field 'global_batch'", state.get("global_batch"), low=1)
        check_int(f"{file}: field 'num_processes'", state.get("num_processes"), low=1)
        if "ema_updates" in state:  # a run with EMA: how many updates the average in model/ holds
            check_int(f"{file}: field 'ema_updates'", state["ema_updates"], low=0, high=step)
        window = state.get("log_window", {"loss": 0.0, "grad_norm": 0.0, "steps": 0})
        if not isinstance(window, dict) or not all(
            isinstance(window.get(k), (int, float)) and not isinstance(window.get(k), bool)
            for k in ("loss", "grad_norm", "steps")
        ):
            raise ValueError(f"{file}: field 'log_window' must hold numbers 'loss', 'grad_norm' and 'steps', "
                             f"got {window!r:.200}")
        check_int(f"{file}: field 'log_window.steps'", window["steps"], low=0, high=step)
    except TypeError as err:
        raise ValueError(str(err)) from None
    history = state.get("eval_history")
    if not isinstance(history, list) or not all(
        isinstance(e, dict) and isinstance(e.get("step"), int) and 1 <= e["step"] <= step for e in history
    ):
        raise ValueError(f"{file}: field 'eval_history' must be a list of evaluations, each with a 'step' in "
                         f"[1, {step}], got {history!r:.200}")
    return state


def checkpoint_problem(checkpoint: str | os.PathLike, hashes: bool = False, num_items: int | None = None) -> str | None:
    """Why ``checkpoint`` cannot be restored exactly (its manifest, its files, its trainer state), or None."""
    checkpoint = Path(checkpoint)
    try:
        check_manifest(checkpoint, "checkpoint", hashes, CHECKPOINT_FILES)
        state = read_trainer_state(checkpoint, num_items)
        rng = [f"random_states_{rank}.pkl" for rank in range(state["num_processes"])]
        check_manifest(checkpoint, "checkpoint", False, rng)
    except (OSError, ValueError) as err:
        return str(err)
    return None


def checkpoint_folders(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Every ``checkpoints/step-N`` folder of a run as (step, folder), oldest first, complete or not."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    found = [(int(m.group(1)), entry) for entry in (root.iterdir() if root.is_dir() else [])
             if (m := CHECKPOINT_RE.match(entry.name)) and entry.is_dir()]
    return sorted(found)


def complete_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """The run's complete checkpoints as (step, folder), oldest first.

    Complete: a ``step-N`` folder whose manifest lists every file a restore needs, every listed file
    has its recorded size, and whose ``trainer_state.json`` is valid and says step N. (Sizes only:
    a resume also checks the hashes of the checkpoint it restores.)
    """
    return [(step, folder) for step, folder in checkpoint_folders(run_dir) if checkpoint_problem(folder) is None]


def newest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run folder, or None."""
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def _model_folder_complete(folder: Path) -> bool:
    try:
        check_manifest(folder, "model", required=("config.json",))
    except (OSError, ValueError):
        return False
    return True


def _finish_replacements(parent: Path, names: str, complete: Callable[[Path], bool]) -> list[str]:
    """Repair what a kill left of ``_util.replace_dir`` (and of pruning) among ``parent``'s ``names`` folders:
    between its two renames the old folder is ``NAME.old-PID`` and the new, complete one ``NAME.tmp``,
    with no ``NAME``; the move is finished. Then leftovers are removed. Returns what was done."""
    done = []
    for old in sorted(parent.glob(f"{names}.old-*")):
        final = parent / old.name.rsplit(".old-", 1)[0]
        tmp = final.with_name(final.name + ".tmp")
        if not final.exists():
            if tmp.is_dir() and complete(tmp):
                os.replace(tmp, final)
                done.append(f"finished moving {tmp} to {final.name}")
            else:
                os.replace(old, final)
                done.append(f"restored {final} from {old.name}")
                continue
        shutil.rmtree(old, ignore_errors=True)
        done.append(f"removed {old}")
    for leftover in [*parent.glob(f"{names}.tmp"), *parent.glob(f"{names}.deleting")]:
        shutil.rmtree(leftover, ignore_errors=True)
        done.append(f"removed {leftover}")
    return done


def remove_partial_checkpoints(run_dir: str | os.PathLike) -> list[str]:
    """Clean up after a kill: finish or undo a folder replacement cut between its two renames (checkpoints
    and ``model/``), delete saves cut short (``step-N.tmp``, ``model.tmp``), checkpoints cut short while
    pruned (``step-N.deleting``) and files cut short while written. Returns what was done, for the log.
    Only names codegpt writes are touched: a run folder may hold the user's own files."""
    run = Path(run_dir)
    done = _finish_replacements(run / CHECKPOINTS_DIR, "step-*",
                                lambda tmp: checkpoint_problem(tmp) is None)
    done += _finish_replacements(run, MODEL_DIR, _model_folder_complete)
    done += _finish_replacements(run, RAW_MODEL_DIR, _model_folder_complete)
    for name in _RUN_FILES:
        for leftover in run.glob(f".{name}.*.tmp"):
            leftover.unlink(missing_ok=True)
            done.append(f"removed {leftover}")
    return done


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def acquire_lock(run_dir: str | os.PathLike) -> Path:
    """Take the run folder's lock (``train.lock``, created exclusively, holding this pid and host) or raise
    ``FileExistsError`` saying who holds it. A lock left by a dead process on this host is taken over."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    lock, host = run / LOCK, socket.gethostname()
    record = json.dumps({"pid": os.getpid(), "host": host,
                         "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
                pid, where = int(holder["pid"]), str(holder["host"])
            except (OSError, ValueError, KeyError, TypeError):
                raise FileExistsError(f"output_dir {run} is locked by {lock}, which does not say who holds it; "
                                      "delete it if no run is training there") from None
            if where == host and pid != os.getpid() and not _pid_alive(pid):
                lock.unlink(missing_ok=True)  # stale: its process is gone
                continue
            raise FileExistsError(
                f"output_dir {run}: another run is training into it (pid {pid} on {where}, since "
                f"{holder.get('time')}); wait for it, or delete {lock} if that process is gone"
            ) from None
        with os.fdopen(fd, "w") as f:
            f.write(record)
            f.flush()
            os.fsync(f.fileno())
        return lock
    raise FileExistsError(f"output_dir {run}: could not take {lock}")


def release_lock(lock: str | os.PathLike) -> None:
    """Give back a lock ``acquire_lock`` took (if it is still this process's)."""
    lock = Path(lock)
    try:
        if json.loads(lock.read_text()).get("pid") == os.getpid():
            lock.unlink()
    except (OSError, ValueError, AttributeError):
        pass


def read_starts(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every start of the run (``starts.jsonl``), oldest first; [] for a run written before starts were kept."""
    file = Path(run_dir) / STARTS
    if not file.is_file():
        return []
    records = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise ValueError(f"{file}: line {number} is not a JSON object")
        records.append(record)
    return records


def record_start(run_dir: str | os.PathLike, record: dict[str, Any], fresh: bool = False) -> None:
    """Add one start to the run's history (``fresh``: the first start of a new run replaces it), atomically."""
    records = [] if fresh else read_starts(run_dir)
    write_text(Path(run_dir) / STARTS, "".join(json.dumps(r) + "\n" for r in [*records, record]))


def verify_run(run_dir: str | os.PathLike, hashes: bool = True) -> list[Path]:
    """Check a run folder: every checkpoint against its manifest (sizes, and SHA-256 when ``hashes``) and
    trainer state, the final ``model/`` against its manifest, and every model folder's weights against its
    config (no missing, unexpected or misshapen tensors). Returns the folders checked; raises ``ValueError``
    listing every problem."""
    run = check_path("run_dir", run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run_dir: no such directory {str(run)!r}")
    checked, problems = [], []
    for _, folder in checkpoint_folders(run):
        problem = checkpoint_problem(folder, hashes=hashes)
        problems += [problem] if problem else _weights_problems(folder / MODEL_DIR)
        checked.append(folder)
    for model_dir in (run / MODEL_DIR, run / RAW_MODEL_DIR):
        if model_dir.is_dir():
            try:
                check_manifest(model_dir, "model", hashes, ("config.json",))
            except (OSError, ValueError) as err:
                problems.append(str(err))
            else:
                problems += _weights_problems(model_dir)
            checked.append(model_dir)
    if not checked:
        raise ValueError(f"run_dir: {str(run)!r} holds neither checkpoints/step-N nor model/: not a training run")
    if problems:
        raise ValueError(f"run_dir {run}: {len(problems)} problem{'s' if len(problems) > 1 else ''}: "
                         + "; ".join(problems))
    return checked


@dataclass(frozen=True)
class RunFiles:
    """A model folder and what its run says about it (see ``resolve_run``)."""

    model_dir: Path
    metrics: dict[str, Any] | None  # the evaluation of these weights, if the run made one
    training_args: dict[str, Any] | None  # those in force: the latest start's
    data: dict[str, Any] | None = None  # the run's RUN_DATA: what its codes decode through
    hub: dict[str, Any] | None = None  # fetched from the Hub: {"repo_id", "revision" (as asked), "commit"}


# What a fetch of a prior from the Hub takes: the model (config, weights, generation config), its codebook and
# autoencoder (`codegpt push` ships them in codebook/ and autoencoder/); not the remote code nor the card.
HUB_PATTERNS = ("*.json", "*.safetensors")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


def is_repo_id(text: str) -> bool:
    """Whether ``text`` reads as a Hub model id ``org/name`` (not a path: no leading ``.``, ``/`` or ``~``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(text, str) or text.count("/") != 1 or text.startswith((".", "~")) or text.endswith("/"):
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def fetch_hub_model(repo_id: str, revision: str | None = None, what: str = "model") -> tuple[Path, str]:
    """The local snapshot of a Hub model (downloaded, or from the cache; offline with ``HF_HUB_OFFLINE=1``)
    and the commit it holds. Fetches ``HUB_PATTERNS`` only. Raises ``FileNotFoundError`` naming ``what``
    when neither the Hub nor the cache has it."""
    from huggingface_hub import snapshot_download

    if revision is not None and (not isinstance(revision, str) or not revision.strip()):
        raise ValueError(f"{what}: revision must be a branch, tag or commit of {repo_id}, got {revision!r}")
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(HUB_PATTERNS)))
    except (OSError, ValueError) as err:  # huggingface_hub's not-found, offline and HTTP errors are OSErrors
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        at = f" at revision {revision!r}" if revision else ""
        raise FileNotFoundError(f"{what}: no such directory {repo_id!r}, and the Hub model {repo_id}{at} could not be "
                                f"fetched ({first})") from None
    # The cache keeps each commit in snapshots/<commit>/.
    commit = folder.name if _COMMIT_RE.match(folder.name) else None
    return folder, commit


def resolve_run(path: str | os.PathLike, what: str = "model_dir", revision: str | None = None) -> RunFiles:
    """The model folder, its evaluation, training arguments and data record of a run (or of a model folder).

    ``path`` is a run folder of ``codegpt train`` (its final ``model/``, else its newest complete
    checkpoint), a checkpoint ``checkpoints/step-N``, any ``save_pretrained`` folder, or a Hub model id
    ``org/name`` (at ``revision``: a branch, tag or commit). A local folder wins over a Hub id of the same
    name; a Hub model is fetched into the Hugging Face cache (``fetch_hub_model``) and gives neither metrics
    nor arguments, and its ``data`` names the codebook it ships (``codebook/``), if any. Metrics are
    those of these weights: a checkpoint's last evaluation at its own step, the final model's last
    line of ``log.jsonl``. A bare model folder outside a run gives neither metrics nor arguments.
    Errors name ``what``, the argument the path came from.
    """
    given = path
    path = check_path(what, path)
    if not path.exists() and isinstance(given, str) and is_repo_id(given):  # a Path object is a path
        folder, commit = fetch_hub_model(given, revision, what)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{what}: the Hub repo {given} (commit {commit}) holds no config.json: not a model")
        record = None
        if (folder / "codebook" / "config.json").is_file():  # the layout of `codegpt push` (codegpt.hub)
            spec = read_json(folder / "codebook" / "config.json", what).get("autoencoder")
            if spec and spec.get("kind") == "diffusers" and (folder / str(spec.get("subfolder")) / "config.json"
                                                              ).is_file():
                spec = {**spec, "source": str(folder), "revision": None}  # the autoencoder of this very commit
            record = {"data": None, "codebook": str(folder / "codebook"), "autoencoder": spec, "split": None}
        return RunFiles(folder, None, None, record, {"repo_id": given, "revision": revision, "commit": commit})
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: no such directory {str(path)!r}")
    if revision is not None:
        raise ValueError(f"{what}: revision {revision!r} is for a Hub model id, and {str(path)!r} is a local folder")
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

    record, run = None, None
    parent = model_dir.parent
    if CHECKPOINT_RE.match(parent.name) and (parent / STATE).is_file():
        state = read_json(parent / STATE, what)
        history = state.get("eval_history") or []
        at_step = [e for e in history if isinstance(e, dict) and e.get("step") == state.get("step")]
        record, run = (at_step[-1] if at_step else None), parent.parent.parent
    elif model_dir.name in (MODEL_DIR, RAW_MODEL_DIR) and (parent / TRAINING_ARGS).is_file():
        run = parent
        record = read_metrics(run, what)
    training_args = read_training_args(run, what) if run is not None else None
    # With EMA a run's model/ folders hold the average, which its evaluations score as ema_*.
    ema = bool((training_args or {}).get("ema_decay")) and model_dir.name == MODEL_DIR
    has_data = run is not None and (run / RUN_DATA).is_file()
    return RunFiles(model_dir, metrics_of(record, ema), training_args,
                    read_json(run / RUN_DATA, what) if has_data else None)


def read_training_args(run_dir: str | os.PathLike, what: str = "run_dir") -> dict[str, Any] | None:
    """A run's arguments in force: the latest start's (a resume may change e.g. max_steps), else those of
    its first start (``training_args.json``), else None."""
    run = Path(run_dir)
    starts = read_starts(run)
    if starts and isinstance(starts[-1].get("args"), dict):
        return starts[-1]["args"]
    return read_json(run / TRAINING_ARGS, what) if (run / TRAINING_ARGS).is_file() else None


def load_model(
    path: str | os.PathLike,
    device: str | torch.device | None = "auto",
    dtype: torch.dtype | str | None = None,
    what: str = "model_dir",
    revision: str | None = None,
) -> GPT:
    """The model of ``path`` (anything ``resolve_run`` accepts: a run, a model folder, a Hub id at
    ``revision``) on ``device``, in eval mode.

    ``dtype=None`` keeps the precision the weights were saved in (transformers' ``dtype="auto"``;
    a training run saves fp32); pass a dtype to cast. ``device="auto"`` is the accelerator when
    there is one, else the CPU.
    """
    model_dir = resolve_run(path, what, revision).model_dir
    model_type = read_json(model_dir / "config.json", what).get("model_type")
    if model_type != GPTConfig.model_type:
        raise ValueError(f"{what}: {str(model_dir)!r} holds a {model_type!r} model, not a {GPTConfig.model_type!r} one")
    target = resolve_device(device)  # before the load: a bad device fails fast
    return _load_gpt(model_dir, what, dtype="auto" if dtype is None else dtype).to(target).eval()


def _load_gpt(model_dir: Path, what: str, **kwargs: Any) -> GPT:
    """``GPT.from_pretrained`` that refuses weights that do not match the config: transformers would
    initialise missing tensors at random and drop unexpected ones, and sample from that without a word."""
    try:
        model, info = GPT.from_pretrained(model_dir, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    except SafetensorError as err:  # a truncated or foreign weights file
        weights = str(model_dir / "model.safetensors")
        raise ValueError(f"{what}: {weights!r} is not a readable safetensors file ({err})") from None
    except OSError as err:  # transformers found no weights file
        raise FileNotFoundError(f"{what}: {err}") from None
    wrong = [f"missing {sorted(info['missing_keys'])}" if info["missing_keys"] else "",
             f"unexpected {sorted(info['unexpected_keys'])}" if info["unexpected_keys"] else "",
             "misshapen " + ", ".join(f"{key} {tuple(saved)} (the config makes {tuple(made)})"
                                      for key, saved, made in sorted(info["mismatched_keys"]))
             if info["mismatched_keys"] else ""]
    if any(wrong):
        raise ValueError(f"{what}: the weights in {str(model_dir)!r} do not match its config.json: "
                         + "; ".join(w for w in wrong if w))
    return model


def _weights_problems(model_dir: Path) -> list[str]:
    try:
        _load_gpt(model_dir, "model")
    except (OSError, ValueError, RuntimeError) as err:
        return [str(err).splitlines()[0]]
    return []


def is_eval_record(record: dict[str, Any]) -> bool:
    """Whether a ``log.jsonl`` record is an evaluation (held-out ``bits_per_code``), not a training record."""
    return "bits_per_code" in record


def metrics_of(record: dict[str, Any] | None, ema: bool = False) -> dict[str, Any] | None:
    """One set of weights' metrics in an evaluation record: the trained weights' (its plain keys), or with
    ``ema`` the EMA weights' (its ``ema_*`` keys, named as plain ones); None when those were not evaluated."""
    if record is None:
        return None
    if not ema:
        return {k: v for k, v in record.items() if not k.startswith(EMA_PREFIX)}
    averaged = {k.removeprefix(EMA_PREFIX): v for k, v in record.items() if k.startswith(EMA_PREFIX)}
    return {"step": record.get("step"), **averaged} if averaged else None


def read_log(path: str | os.PathLike, what: str = "run_dir") -> list[dict[str, Any]]:
    """Every record of a run's ``log.jsonl`` (``path``: the run folder or the file), oldest first; [] when there
    is none. A last line cut short by a kill is left out; any other unreadable line is an error naming it."""
    file = Path(path) / LOG if Path(path).is_dir() else Path(path)
    if not file.is_file():
        return []
    lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        elif number < len(lines):
            raise ValueError(f"{what}: {str(file)!r} line {number} is not a log record (a JSON object with a 'step')")
    return records


def merge_log(training: list[dict[str, Any]], evaluations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Training records and evaluations in the order a run writes them: by step, a step's training record
    before its evaluation."""
    return sorted([*training, *evaluations], key=lambda r: (r["step"], is_eval_record(r)))


def read_metrics(path: str | os.PathLike, what: str = "run_dir") -> dict[str, Any] | None:
    """The run's last evaluation record in ``log.jsonl`` (``path``: the run folder or the file), or None."""
    evaluations = [r for r in read_log(path, what) if is_eval_record(r)]
    return evaluations[-1] if evaluations else None


def write_log(run_dir: str | os.PathLike, records: list[dict[str, Any]]) -> None:
    """Replace the run's log with ``records``, atomically."""
    write_text(Path(run_dir) / LOG, "".join(json.dumps(r) + "\n" for r in records))


def append_log(run_dir: str | os.PathLike, record: dict[str, Any]) -> None:
    """Add one record to the run's log. An append of one short line: a kill leaves at worst a
    truncated last line, and the next run rewrites the log from its checkpoint (``write_log``)."""
    with open(Path(run_dir) / LOG, "a") as f:
        f.write(json.dumps(record) + "\n")


def plot_losses(run_dir: str | os.PathLike) -> Path | None:
    """Draw ``loss.png`` from the run's log: the training loss and the held-out loss (and the EMA weights')
    in nats per code against step. None when the log holds nothing to draw; ImportError without matplotlib."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no display backend

    records = read_log(run_dir)
    training = [(r["step"], r["loss"]) for r in records if not is_eval_record(r) and "loss" in r]
    evaluations = [r for r in records if is_eval_record(r)]
    if not training and not evaluations:
        return None
    figure = Figure(figsize=(6, 4), dpi=100, layout="constrained")
    ax = figure.add_subplot()
    if training:
        ax.plot(*zip(*training, strict=True), label="training", color="tab:blue", alpha=0.8)
    for key, label, color in (("loss_nats", "held-out", "tab:orange"), ("ema_loss_nats", "held-out, EMA", "tab:green")):
        points = [(r["step"], r[key]) for r in evaluations if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), label=label, color=color, marker="o", markersize=3)
    ax.set(xlabel="step", ylabel="loss (nats per code)", title=Path(run_dir).resolve().name)
    ax.grid(alpha=0.3)
    ax.legend()
    return atomic_write(Path(run_dir) / LOSS_PLOT, lambda f: figure.savefig(f, format="png"))


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
    images: np.ndarray | torch.Tensor, path: str | os.PathLike, rows: int, scale: int = 8, pad: int = 2,
    row_labels: Sequence[str] | None = None,
) -> Path:
    """Tile images (N, h, w) or (N, h, w, 3) with values in [0, 1] into ``rows`` rows and write a PNG
    atomically. Each pixel is upscaled ``scale`` times so that small images stay viewable; a grey
    gutter of ``pad`` pixels separates them (grey: neither the ink nor the paper of any image).
    ``row_labels`` (one string per row, e.g. the class names) are written in a white margin on the left,
    in PIL's default font."""
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
    if row_labels is not None:
        labels = [str(label) for label in row_labels]
        if len(labels) != rows:
            raise ValueError(f"row_labels must hold one label per row ({rows}), got {len(labels)}")
        picture = _label_rows(picture, labels, row_height=h * scale + pad, pad=pad)
    return atomic_write(path, lambda f: picture.save(f, format="PNG"))


def _label_rows(picture: Any, labels: list[str], row_height: int, pad: int) -> Any:
    """``picture`` with a white margin on its left holding ``labels[r]`` beside row ``r``, centred on it."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    measure = ImageDraw.Draw(picture)
    boxes = [measure.textbbox((0, 0), label, font=font) for label in labels]
    margin = max(box[2] - box[0] for box in boxes) + 3 * pad
    out = Image.new("RGB", (picture.width + margin, picture.height), "white")
    out.paste(picture, (margin, 0))
    pen = ImageDraw.Draw(out)
    for r, (label, box) in enumerate(zip(labels, boxes, strict=True)):
        top = pad + r * row_height + (row_height - pad - (box[3] - box[1])) // 2 - box[1]
        pen.text((margin - pad - (box[2] - box[0]) - box[0], top), label, fill="black", font=font)
    return out
