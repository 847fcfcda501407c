"""codegpt._util: the one atomic writer and the one set of value checks."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from codegpt._util import (
    as_tensor,
    atomic_write,
    check_choice,
    check_float,
    check_int,
    check_path,
    read_json,
    replace_dir,
    resolve_device,
    save_safetensors,
    write_json,
    write_text,
)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = write_text(tmp_path / "a" / "note.txt", "old\n")  # creates the folder

    def crash(f):
        f.write(b"half a fi")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        atomic_write(target, crash)
    assert target.read_text() == "old\n"
    assert os.listdir(target.parent) == ["note.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # a new file's usual mode, not a temp file's 0600


def test_writers_round_trip(tmp_path):
    path = write_json(tmp_path / "x.json", {"a": [1, 2]})
    assert path.read_text().endswith("}\n") and json.loads(path.read_text()) == {"a": [1, 2]}
    save_safetensors(tmp_path / "t.safetensors", {"w": torch.arange(3)}, metadata={"format": "x"})
    assert torch.equal(load_file(tmp_path / "t.safetensors")["w"], torch.arange(3))


def test_replace_dir_swaps_a_folder_whole(tmp_path):
    for name, text in (("final", "old"), ("tmp", "new")):
        write_text(tmp_path / name / "f.txt", text)
    replace_dir(tmp_path / "tmp", tmp_path / "final")
    assert (tmp_path / "final" / "f.txt").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["final"]


def test_read_json_names_the_argument(tmp_path):
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(ValueError, match="--metrics: .* must hold a JSON object, got list"):
        read_json(tmp_path / "list.json", "--metrics")
    with pytest.raises(FileNotFoundError, match="--metrics: no such file"):
        read_json(tmp_path / "missing.json", "--metrics")


def test_checks_name_the_argument_the_value_and_the_range(tmp_path):
    assert check_int("n", np.int64(3), low=1) == 3 and type(check_int("n", np.int64(3))) is int
    with pytest.raises(TypeError, match="n must be an int, got bool True"):
        check_int("n", True)
    with pytest.raises(ValueError, match=r"n must be in \[1, 4\], got 5"):
        check_int("n", 5, 1, 4)
    with pytest.raises(ValueError, match="n must be >= 0, got -1"):
        check_int("n", -1, low=0)
    assert check_float("p", 1, 0.0, 1.0) == 1.0
    with pytest.raises(ValueError, match=r"p must be a number in \(0.0, 1.0\), got 1.0"):
        check_float("p", 1.0, 0.0, 1.0, low_open=True, high_open=True)
    with pytest.raises(ValueError, match="p must be a number"):
        check_float("p", float("nan"))
    with pytest.raises(ValueError, match=r"m must be one of \('a', 'b'\), got 'c'"):
        check_choice("m", "c", ("a", "b"))
    assert check_path("p", str(tmp_path)) == tmp_path
    with pytest.raises(TypeError, match="p must be a path"):
        check_path("p", 3)
    assert as_tensor("x", np.ones(2, dtype=np.int32)).dtype == torch.float32
    with pytest.raises(TypeError, match="x must hold integers"):
        as_tensor("x", torch.ones(2), integer=True)
    with pytest.raises(TypeError, match="x must be a torch.Tensor or numpy array, got list"):
        as_tensor("x", [1])


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps", "xpu", "hpu", "mtia", "npu")
    with pytest.raises(ValueError, match="device 'gpu9'"):
        resolve_device("gpu9")
