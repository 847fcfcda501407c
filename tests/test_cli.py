"""The `codegpt` command: errors that say what to fix, a demo smoke run, and sample/eval on its output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import reset_accelerate
from safetensors.torch import load_file, save_file

from codegpt.cli import build_parser, main
from codegpt.data import write_code_dataset

REPO = Path(__file__).resolve().parents[1]

# Commands run in-process; each starts from a clean Accelerate state.
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """A tiny demo run (seconds): the real pipeline with a toy model and few steps."""
    out = tmp_path_factory.mktemp("demo")
    reset_accelerate()  # module-scoped: set up before the per-test reset
    status = main([
        "demo", "--out", str(out), "--steps", "20", "--batch-size", "32", "--embed-dim", "32", "--layers", "1",
        "--heads", "2", "--samples-per-class", "4", "--grid-columns", "3", "--no-progress",
    ])
    assert status == 0
    return out


@pytest.fixture
def small_dataset(tmp_path, random_codes) -> Path:
    """24 items of random 4x4 codes from a 16-code codebook, 3 classes."""
    codes, labels = random_codes(24, (4, 4), codebook_size=16, num_classes=3)
    return write_code_dataset(tmp_path / "data", codes, labels, codebook_size=16, num_classes=3)


def test_demo_smoke_writes_png_and_metrics(demo_dir, capsys):
    png = demo_dir / "samples.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    width, height = Image.open(png).size
    assert height > width * 10 / 3 * 0.9  # 10 rows (classes) of 3 columns
    report = json.loads((demo_dir / "metrics.json").read_text())
    m = report["eval"]
    for key in ("bits_per_code", "baseline_bits_per_code", "bits_ratio", "class_consistency_guided",
                "class_consistency_unguided", "judge_accuracy", "novelty_guided", "codebook_mse"):
        assert isinstance(m[key], float), key
    assert 0.0 <= m["class_consistency_guided"] <= 1.0
    assert m["judge_accuracy"] >= 0.98  # the judge does not depend on the toy prior
    assert m["codebook_mse"] <= 1.0
    assert set(report["targets_met"]) >= {"bits_ratio", "class_consistency_guided", "novelty", "codebook_mse"}
    assert (demo_dir / "run" / "model" / "config.json").is_file()
    assert (demo_dir / "codebook" / "model.safetensors").is_file()


def test_sample_and_eval_on_the_demo_output(demo_dir, tmp_path, capsys):
    png, codes = tmp_path / "s.png", tmp_path / "codes.safetensors"
    status = main([
        "sample", str(demo_dir / "run"), "--out", str(png), "--codes-out", str(codes), "--classes", "3,7",
        "--per-class", "2", "--guidance-scale", "2", "--codebook", str(demo_dir / "codebook"),
    ])
    assert status == 0
    tensors = load_file(codes)
    assert tensors["codes"].shape == (4, 4, 4) and tensors["classes"].tolist() == [3, 3, 7, 7]
    assert png.read_bytes()[:4] == b"\x89PNG"

    metrics_json = tmp_path / "eval.json"
    status = main([
        "eval", str(demo_dir / "run" / "model"), "--data", str(demo_dir / "data"), "--samples-per-class", "3",
        "--digits", "--codebook", str(demo_dir / "codebook"), "--out", str(metrics_json),
    ])
    assert status == 0
    metrics = json.loads(metrics_json.read_text())["eval"]
    # The same split and model as the demo: the same held-out figure.
    demo = json.loads((demo_dir / "metrics.json").read_text())["eval"]
    assert metrics["bits_per_code"] == pytest.approx(demo["bits_per_code"], rel=1e-6)
    assert metrics["baseline_bits_per_code"] == pytest.approx(demo["baseline_bits_per_code"])
    assert 0.0 <= metrics["class_consistency_unguided"] <= 1.0
    assert metrics["judge_accuracy"] == demo["judge_accuracy"]
    assert "bits_per_code" in capsys.readouterr().out


def test_train_errors_for_a_missing_dataset(tmp_path, capsys):
    status = main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert status == 2
    assert "does not exist" in err and "fit-codebook" in err
    assert "Traceback" not in err


def test_train_errors_for_a_config_that_does_not_match_the_dataset(small_dataset, tmp_path, capsys):
    data = small_dataset  # 16 codes, 4x4 grid, 3 classes
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "model_type": "codegpt", "vocab_size": 33, "seq_len": 64, "embed_dim": 32, "num_layers": 1,
        "num_heads": 2, "class_conditional": True, "num_classes": 10,
    }))
    status = main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--config", str(config)])
    err = capsys.readouterr().err
    assert status == 2
    assert "codebook_size 32 != 16" in err and "vocab_size=17" in err
    assert "seq_len 64" in err and "seq_len=16" in err
    assert "num_classes=3" in err


def test_train_runs_and_refuses_to_mix_runs_without_resume(small_dataset, tmp_path, capsys):
    data = small_dataset
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "8",
            "--embed-dim", "16", "--layers", "1", "--heads", "2", "--save-every", "1", "--no-progress",
            "--samples-per-class", "1"]
    assert main(argv) == 0
    assert "held-out:" in capsys.readouterr().out
    assert main(argv) == 2
    assert "--resume" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0


def test_train_leaves_the_precision_to_accelerate_unless_given():
    # `accelerate launch --mixed_precision bf16 -m codegpt train ...` must not be overridden by a default.
    parser = build_parser()
    base = ["train", "--data", "d", "--out", "o"]
    assert parser.parse_args(base).mixed_precision is None
    assert parser.parse_args([*base, "--mixed-precision", "bf16"]).mixed_precision == "bf16"
    assert parser.parse_args(["demo"]).mixed_precision == "no"


def test_fit_codebook_from_latents(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(30, 2, 3, 4, generator=g)
    file = tmp_path / "latents.safetensors"
    save_file({"latents": latents, "labels": torch.arange(30) % 2}, str(file))
    status = main(["fit-codebook", "--latents", str(file), "--out", str(tmp_path / "out"), "--num-codes", "8"])
    assert status == 0
    meta = json.loads((tmp_path / "out" / "data" / "dataset.json").read_text())
    assert meta["codebook_size"] == 8 and meta["grid"] == [2, 3] and meta["num_classes"] == 2
    assert "codegpt train --data" in capsys.readouterr().out

    save_file({"wrong": latents}, str(file))
    assert main(["fit-codebook", "--latents", str(file), "--out", str(tmp_path / "o2")]) == 2
    assert "'latents'" in capsys.readouterr().err


def test_python_dash_m_codegpt_help():
    proc = subprocess.run([sys.executable, "-m", "codegpt", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    for command in ("demo", "fit-codebook", "train", "sample", "eval", "push"):
        assert command in proc.stdout
