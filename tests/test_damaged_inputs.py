"""Damaged inputs, as a careless or unlucky user would hand them over: each is refused through the
library with an error that names the file or field, and through the CLI with one line on stderr naming
the file or flag, exit status 2, no traceback, and nothing written or destroyed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from codegpt import GPT, GPTConfig
from codegpt.cli import main
from codegpt.codebook import Codebook
from codegpt.data import CodeDataset, write_code_dataset
from codegpt.runs import load_model

REPO = Path(__file__).resolve().parents[1]
CODEBOOK_SIZE, GRID, NUM_CLASSES = 16, (2, 4), 3


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A tiny intact set of inputs: data/ (a code dataset in 2 shards that records ../codebook), codebook/
    (16 codes of 2x2 pixel patches) and model/ (a prior sized for them). Tests damage a copy."""
    root = tmp_path_factory.mktemp("pristine")
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, CODEBOOK_SIZE, (20, *GRID), generator=g)
    labels = torch.randint(0, NUM_CLASSES, (20,), generator=g)
    write_code_dataset(root / "data", codes, labels, codebook_size=CODEBOOK_SIZE, num_classes=NUM_CLASSES,
                       shard_size=10, metadata={"codebook": "../codebook"})
    Codebook.from_centroids(torch.rand(CODEBOOK_SIZE, 4, generator=g)).save_pretrained(root / "codebook")
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=CODEBOOK_SIZE + 1, seq_len=GRID[0] * GRID[1], embed_dim=16, num_layers=1,
                       num_heads=2, class_conditional=True, num_classes=NUM_CLASSES)
    GPT(config).save_pretrained(root / "model")
    return root


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every folder under ``root``: what must be left as it was."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


# --- the damage: each edits the copy in place ----------------------------------------------------------


def _edit_json(file: str, change: Callable[[dict], object]) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        path = root / file
        data = json.loads(path.read_text())
        result = change(data)
        path.write_text(json.dumps(data if result is None else result))

    return damage


def _write(file: str, content: bytes) -> Callable[[Path], None]:
    return lambda root: (root / file).write_bytes(content)


def _truncate(file: str, keep: int = -7) -> Callable[[Path], None]:
    return lambda root: (root / file).write_bytes((root / file).read_bytes()[:keep])


def _delete(file: str) -> Callable[[Path], None]:
    return lambda root: (root / file).unlink()


def _flip_bit(file: str, from_end: int = 1) -> Callable[[Path], None]:
    """Flip the lowest bit of a byte near the end of the data: a code or a float mantissa, a value still in
    range and the file still well-formed."""
    def damage(root: Path) -> None:
        data = bytearray((root / file).read_bytes())
        data[-from_end] ^= 1
        (root / file).write_bytes(bytes(data))

    return damage


def _retensor(file: str, **changes: torch.Tensor) -> Callable[[Path], None]:
    """Rewrite a safetensors file with some tensors replaced (a well-formed file, other content)."""
    def damage(root: Path) -> None:
        tensors = load_file(root / file)
        tensors.update(changes)
        save_file(tensors, str(root / file))

    return damage


def _set(**values: object) -> Callable[[dict], None]:
    return lambda data: data.update(values)


def _drop(key: str) -> Callable[[dict], None]:
    return lambda data: data.pop(key) and None


def _shards(change: Callable[[list], object]) -> Callable[[dict], None]:
    return lambda data: change(data["shards"])


def _smaller_codebook(root: Path) -> None:
    shutil.rmtree(root / "codebook")
    Codebook.from_centroids(torch.rand(CODEBOOK_SIZE // 2, 4)).save_pretrained(root / "codebook")


SHARD = "data/codes-00001.safetensors"
U8_CODES = torch.zeros(10, *GRID, dtype=torch.uint8)


@dataclass
class Case:
    id: str
    damage: Callable[[Path], None]
    names: str  # what the library's message and the CLI's line must both name
    verify: bool = False  # found by hashes only: the library is asked to verify, the CLI runs `codegpt verify`


DATASET_CASES = [
    Case("metadata-not-json", _write("data/dataset.json", b"{ not json"), "dataset.json"),
    Case("metadata-not-utf8", _write("data/dataset.json", b"\xff\xfe\x00garbage"), "dataset.json"),
    Case("metadata-a-list", _write("data/dataset.json", b"[1, 2, 3]"), "dataset.json"),
    Case("metadata-missing", _delete("data/dataset.json"), "dataset.json"),
    Case("no-codebook-size", _edit_json("data/dataset.json", _drop("codebook_size")), "codebook_size"),
    Case("no-grid", _edit_json("data/dataset.json", _drop("grid")), "grid"),
    Case("no-shards", _edit_json("data/dataset.json", _drop("shards")), "shards"),
    Case("codebook-size-a-string", _edit_json("data/dataset.json", _set(codebook_size="16")), "codebook_size"),
    Case("format-version-99", _edit_json("data/dataset.json", _set(format_version=99)), "format_version"),
    Case("foreign-format", _edit_json("data/dataset.json", _set(format="something.else")), "dataset.json"),
    Case("num-items-huge", _edit_json("data/dataset.json", _set(num_items=10**15)), "num_items"),
    Case("num-items-negative", _edit_json("data/dataset.json", _set(num_items=-5)), "num_items"),
    Case("shard-num-items-huge",
         _edit_json("data/dataset.json", _shards(lambda s: s[1].update(num_items=10**15))), "num_items"),
    Case("codebook-size-huge", _edit_json("data/dataset.json", _set(codebook_size=10**15)), "codebook_size"),
    Case("num-classes-huge", _edit_json("data/dataset.json", _set(num_classes=10**12)), "num_classes"),
    Case("grid-huge", _edit_json("data/dataset.json", _set(grid=[10**9, 10**9])), "codes-00000"),
    Case("shard-listed-twice", _edit_json("data/dataset.json", _shards(lambda s: s.append(dict(s[0])))),
         "codes-00000"),
    Case("shard-outside-the-folder",
         _edit_json("data/dataset.json", _shards(lambda s: s[0].update(file="../codebook/model.safetensors"))),
         "plain file name"),
    Case("class-names-too-few", _edit_json("data/dataset.json", _set(class_names=["a"])), "class_names"),
    Case("shard-record-not-a-record",
         _edit_json("data/dataset.json", _shards(lambda s: s[1].update(bytes="many"))), "codes-00001"),
    Case("shard-missing", _delete(SHARD), "codes-00001"),
    Case("shard-truncated", _truncate(SHARD), "codes-00001"),
    Case("shard-garbage-header", _write(SHARD, b"\x89PNG\r\n\x1a\n" + bytes(300)), "codes-00001"),
    Case("shard-header-length-absurd", _write(SHARD, (2**60).to_bytes(8, "little") + b"{}"), "codes-00001"),
    Case("shard-float-codes", _retensor(SHARD, codes=torch.zeros(10, *GRID)), "codes-00001"),
    Case("shard-code-out-of-range", _retensor(SHARD, codes=torch.full((10, *GRID), CODEBOOK_SIZE, dtype=torch.uint8)),
         "codes-00001"),
    Case("shard-label-out-of-range", _retensor(SHARD, labels=torch.full((10,), NUM_CLASSES, dtype=torch.uint8)),
         "codes-00001"),
    Case("shard-other-dtype-same-values", _retensor(SHARD, codes=U8_CODES.to(torch.int16)), "codes-00001"),
    Case("shard-bit-flip-in-range", _flip_bit(SHARD, from_end=12), "codes-00001", verify=True),
]

CODEBOOK_CASES = [
    Case("codebook-config-not-json", _write("codebook/config.json", b"{ nope"), "config.json"),
    Case("codebook-config-a-list", _write("codebook/config.json", b"[]"), "config.json"),
    Case("codebook-format-version-2", _edit_json("codebook/config.json", _set(format_version=2)), "format_version"),
    Case("codebook-num-codes-negative", _edit_json("codebook/config.json", _set(num_codes=-3)), "num_codes"),
    Case("codebook-weights-missing", _delete("codebook/model.safetensors"), "model.safetensors"),
    Case("codebook-weights-truncated", _truncate("codebook/model.safetensors"), "model.safetensors"),
    Case("codebook-centroids-nan", _retensor("codebook/model.safetensors",
                                             centroids=torch.full((CODEBOOK_SIZE, 4), float("nan"))),
         "centroids"),
    Case("codebook-bit-flip", _flip_bit("codebook/model.safetensors"), "model.safetensors", verify=True),
]

MODEL_CASES = [
    Case("model-config-not-json", _write("model/config.json", b"{ nope"), "config.json"),
    Case("model-config-a-list", _write("model/config.json", b"[]"), "config.json"),
    Case("model-vocab-size-a-string", _edit_json("model/config.json", _set(vocab_size="big")), "vocab_size"),
    Case("model-num-layers-negative", _edit_json("model/config.json", _set(num_layers=-1)), "num_layers"),
    Case("model-embed-dim-not-divisible", _edit_json("model/config.json", _set(embed_dim=15)), "embed_dim"),
    Case("model-weights-missing", _delete("model/model.safetensors"), "model.safetensors"),
    Case("model-weights-truncated", _truncate("model/model.safetensors", keep=200), "model.safetensors"),
]


def _library(kind: str, case: Case, root: Path) -> None:
    if kind == "data":
        CodeDataset(root / "data", verify=case.verify)
    elif kind == "codebook":
        Codebook.from_pretrained(root / "codebook", verify=case.verify)
    else:
        load_model(root / "model", device="cpu")


def _argv(kind: str, case: Case, root: Path) -> list[str]:
    out = str(root / "out" / "samples.png")
    if case.verify:
        return ["verify", str(root / kind)]
    if kind == "data":  # the held-out evaluation of an intact model on the damaged data
        return ["eval", str(root / "model"), "--data", str(root / "data"), "--samples-per-class", "1",
                "--out", str(root / "out" / "eval.json"), "--device", "cpu"]
    if kind == "codebook":
        return ["sample", str(root / "model"), "--codebook", str(root / "codebook"), "--out", out, "--device", "cpu"]
    return ["sample", str(root / "model"), "--out", out, "--device", "cpu"]


CASES = ([("data", c) for c in DATASET_CASES] + [("codebook", c) for c in CODEBOOK_CASES]
         + [("model", c) for c in MODEL_CASES])


@pytest.fixture
def damaged(pristine, tmp_path, request):
    kind, case = request.param
    root = tmp_path / "inputs"
    shutil.copytree(pristine, root)
    case.damage(root)
    return kind, case, root


@pytest.mark.parametrize("damaged", CASES, ids=[c.id for _, c in CASES], indirect=True)
def test_the_library_names_the_file_or_field(damaged):
    kind, case, root = damaged
    before = snapshot(root)
    with pytest.raises((ValueError, TypeError, FileNotFoundError)) as info:
        _library(kind, case, root)
    assert case.names in str(info.value)
    assert snapshot(root) == before


@pytest.mark.parametrize("damaged", CASES, ids=[c.id for _, c in CASES], indirect=True)
def test_the_cli_says_one_line_and_touches_nothing(damaged, capsys):
    kind, case, root = damaged
    before = snapshot(root)
    status = main(_argv(kind, case, root))
    out, err = capsys.readouterr()
    assert status == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert case.names in lines[0] and lines[0].startswith(f"codegpt {_argv(kind, case, root)[0]}: error: ")
    assert snapshot(root) == before


def test_the_intact_inputs_pass_both_ways(pristine, tmp_path, capsys):
    # The control: nothing above fails for a reason other than its damage.
    assert len(CodeDataset(pristine / "data", verify=True)) == 20
    assert Codebook.from_pretrained(pristine / "codebook", verify=True).num_codes == CODEBOOK_SIZE
    assert load_model(pristine / "model", device="cpu").config.codebook_size == CODEBOOK_SIZE
    for kind in ("data", "codebook"):
        assert main(["verify", str(pristine / kind)]) == 0
    assert main(["sample", str(pristine / "model"), "--codebook", str(pristine / "codebook"), "--out",
                 str(tmp_path / "s.png"), "--per-class", "1", "--device", "cpu"]) == 0


def test_a_codebook_smaller_than_the_models_vocabulary_is_refused_before_sampling(pristine, tmp_path, capsys):
    root = tmp_path / "inputs"
    shutil.copytree(pristine, root)
    _smaller_codebook(root)
    before = snapshot(root)
    model = load_model(root / "model", device="cpu")
    with pytest.raises(ValueError, match="num_codes 8"):
        Codebook.from_pretrained(root / "codebook").check_codebook_size(model.config.codebook_size)
    capsys.readouterr()
    argv = ["sample", str(root / "model"), "--codebook", str(root / "codebook"), "--out", str(root / "s.png")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--codebook" in err and "num_codes 8" in err and "16" in err
    assert snapshot(root) == before


@pytest.mark.parametrize("kind,case", [CASES[0], CASES[len(DATASET_CASES)]], ids=["dataset", "codebook"])
def test_through_a_real_process(pristine, tmp_path, kind, case):
    root = tmp_path / "inputs"
    shutil.copytree(pristine, root)
    case.damage(root)
    before = snapshot(root)
    proc = subprocess.run([sys.executable, "-m", "codegpt", *_argv(kind, case, root)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert case.names in proc.stderr
    assert snapshot(root) == before
