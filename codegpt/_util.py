"""Small helpers every other module uses: atomic writes, checks of user values, device resolution.

One home each, so that a file is never half-written anywhere and an error for a bad value reads
the same everywhere: it names the argument, the value and what is allowed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import safetensors.torch
import torch

__all__ = [
    "atomic_write", "write_text", "write_json", "save_safetensors", "replace_dir", "read_json", "check_format",
    "file_record", "check_file_records", "as_tensor", "check_int", "check_float", "check_choice", "check_path",
    "resolve_device",
]


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where folders cannot be opened or synced, e.g. Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write a file so that a reader (or a kill) sees the old content or the new, never a mix.

    ``write`` fills a temporary file in the same folder; it is flushed and fsynced, renamed over
    ``path`` with ``os.replace``, and the folder is fsynced so that the rename survives a crash.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    # os.open with 0o666 lets the umask decide the mode, as for any new file (mkstemp would make it 0600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) atomically."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON values: mappings and sequences recursively, numpy scalars as Python numbers,
    non-finite floats as None, torch dtypes by name (``"float32"``), anything else as its ``str``."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.integer, np.floating)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    return str(obj)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON with a trailing newline, atomically."""
    return write_text(path, json.dumps(obj, indent=2) + "\n")


def save_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write tensors to a safetensors file atomically."""
    data = safetensors.torch.save(dict(tensors), metadata=dict(metadata) if metadata is not None else None)
    return atomic_write(path, lambda f: f.write(data))


def replace_dir(tmp_dir: str | os.PathLike, final_dir: str | os.PathLike) -> None:
    """Move a finished folder (or file) into place. An old folder of that name is moved aside first
    (``os.replace`` cannot overwrite a non-empty folder) and deleted after."""
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    if final_dir.is_dir():
        old = final_dir.with_name(f"{final_dir.name}.old-{os.getpid()}")
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)
    _fsync_dir(final_dir.parent)


def read_json(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """Read a JSON object, or the last record of a JSON-lines file (``.jsonl``); errors name
    ``what`` (the argument the file came from) and the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no such file {str(path)!r}")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            lines = [line for line in text.splitlines() if line.strip()]
            if not lines:
                raise ValueError(f"{what}: {str(path)!r} holds no record")
            text = lines[-1]
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{what}: {str(path)!r} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what}: {str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    """``{"bytes": size, "sha256": hex digest}`` of a file, for manifests that a later load verifies."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": Path(path).stat().st_size, "sha256": digest.hexdigest()}


def check_file_records(folder: str | os.PathLike, records: Mapping[str, Any], what: str, hashes: bool = False) -> None:
    """Raise ``ValueError`` naming the file unless every ``name: file_record`` in ``records`` matches the
    file in ``folder``: its size always, its SHA-256 when ``hashes`` (reads every byte)."""
    folder = Path(folder)
    for name, record in records.items():
        file = folder / name
        if not isinstance(record, Mapping) or not isinstance(record.get("bytes"), int):
            raise ValueError(f"{what}: the record of {str(file)!r} is not {{'bytes': int, 'sha256': str}}: {record!r}")
        if not file.is_file():
            raise ValueError(f"{what}: {str(file)!r} is missing")
        size = file.stat().st_size
        if size != record["bytes"]:
            raise ValueError(f"{what}: {str(file)!r} holds {size} bytes, {record['bytes']} were written")
        if hashes and file_record(file)["sha256"] != record.get("sha256"):
            raise ValueError(f"{what}: {str(file)!r} does not match its SHA-256 (changed after it was written)")


def check_format(file: str | os.PathLike, meta: Mapping[str, Any], name: str, version: int) -> None:
    """Raise unless metadata ``meta`` (read from ``file``) says ``"format": name`` at ``"format_version": version``."""
    if meta.get("format") != name:
        raise ValueError(f'{file} is not {name} metadata (expected "format": "{name}", got {meta.get("format")!r})')
    if meta.get("format_version") != version:
        raise ValueError(f"{file}: format_version {meta.get('format_version')!r} is not supported "
                         f"(this codegpt reads version {version})")


# Value checks: each returns the normalised value or raises naming the argument.


def _range_text(low: float | None, high: float | None, low_open: bool = False, high_open: bool = False) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high}"
    return "any value"


def check_int(name: str, value: object, low: int | None = None, high: int | None = None) -> int:
    """An int (numpy integers included, bools not) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be {_range_text(low, high)}, got {value}")
    return value


def check_float(name: str, value: object, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number (ints accepted, bools not) within the bounds; returned as a float."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
    ok = ok and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise ValueError(f"{name} must be a number {_range_text(low, high, low_open, high_open)}, got {value!r}")
    return float(value)


def as_tensor(name: str, value: object, *, integer: bool = False) -> torch.Tensor:
    """A tensor from a tensor or numpy array, holding integers (``integer=True``) or real numbers
    (floats kept as fp32/fp64; integers and fp16/bf16 become fp32, which distances need)."""
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(value).__name__}")
    if value.dtype == torch.bool or value.is_complex() or (integer and value.is_floating_point()):
        raise TypeError(f"{name} must hold {'integers' if integer else 'real numbers'}, got dtype {value.dtype}")
    if integer or value.dtype in (torch.float32, torch.float64):
        return value
    return value.float()


def check_choice(name: str, value: object, choices: Iterable[Any]) -> Any:
    """One of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_path(name: str, value: object) -> Path:
    """A str or os.PathLike, as a Path."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or os.PathLike), got {type(value).__name__}")
    return Path(value)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or None) is the current accelerator when torch sees one, else the CPU."""
    if device is None or device == "auto":
        if hasattr(torch, "accelerator"):  # torch >= 2.6: CUDA, ROCm, XPU, MPS, ...
            found = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        else:
            found = "cuda" if torch.cuda.is_available() else None
        return torch.device(found if found is not None else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a device torch knows ({err})") from None
