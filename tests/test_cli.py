"""The `codegpt` command: errors that say what to fix, a demo smoke run, and sample/eval on its output."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
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
    """A tiny demo run on the patch path (seconds): a toy model and few steps (tests/test_demo.py checks the
    demo itself)."""
    out = tmp_path_factory.mktemp("demo")
    reset_accelerate()  # module-scoped: set up before the per-test reset
    status = main([
        "demo", "--out", str(out), "--steps", "20", "--batch-size", "32", "--embed-dim", "32", "--layers", "1",
        "--heads", "2", "--samples-per-class", "4", "--grid-columns", "3", "--no-progress", "--autoencoder", "patches",
        "--feature-steps", "20",
    ])
    assert status == 0
    return out


@pytest.fixture
def small_dataset(tmp_path, random_codes) -> Path:
    """24 items of random 4x4 codes from a 16-code codebook, 3 classes."""
    codes, labels = random_codes(24, (4, 4), codebook_size=16, num_classes=3)
    return write_code_dataset(tmp_path / "data", codes, labels, codebook_size=16, num_classes=3)


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
    assert main([*argv, "--resume"]) == 2  # the run is at step 2 already: nothing to do is an error
    assert "already at step 2" in capsys.readouterr().err
    assert main([*argv, "--resume", "--steps", "3"]) == 0


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
    for command in ("demo", "encode", "fit-codebook", "train", "sample", "eval", "push"):
        assert command in proc.stdout


# ------------------------------------------------------------------ images in, images out


def _png_folder(root: Path, n: int = 24, size: int = 8, classes=("a", "b", "c")) -> Path:
    """n grey PNGs in class subfolders; the classes differ in brightness."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        label = i % len(classes)
        folder = root / classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 80, (size, size)) + 80 * label
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root


def _tiny_vae(folder: Path, seed: int = 0) -> Path:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    diffusers.AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                            latent_channels=4, norm_num_groups=4, sample_size=8,
                            mid_block_add_attention=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def encoded_run(tmp_path_factory):
    """PNGs -> a tiny saved AutoencoderKL -> `codegpt encode` -> `codegpt train` (a toy prior, a few steps)."""
    pytest.importorskip("torchmetrics")
    root = tmp_path_factory.mktemp("images")
    reset_accelerate()
    folder, vae = _png_folder(root / "pngs"), _tiny_vae(root / "vae")
    assert main(["encode", "--images", str(folder), "--autoencoder", str(vae), "--num-codes", "8",
                 "--val-fraction", "0.25", "--batch-size", "8", "--out", str(root / "enc"), "--no-progress"]) == 0
    reset_accelerate()
    assert main(["train", "--data", str(root / "enc"), "--out", str(root / "run"), "--steps", "3",
                 "--batch-size", "8", "--embed-dim", "16", "--layers", "1", "--heads", "2", "--no-progress",
                 "--samples-per-class", "2"]) == 0
    return root


def test_encode_records_the_autoencoder_codebook_and_split(encoded_run):
    enc = encoded_run / "enc"
    for part, count in (("train", 18), ("val", 6)):
        meta = json.loads((enc / part / "dataset.json").read_text())
        assert meta["num_items"] == count and meta["grid"] == [4, 4] and meta["class_names"] == ["a", "b", "c"]
        assert meta["autoencoder"]["class"] == "AutoencoderKL"
        assert meta["autoencoder"]["source"] == str((encoded_run / "vae").resolve())
        assert (enc / part / meta["codebook"]).resolve() == (enc / "codebook").resolve()
        assert meta["split"]["part"] == part and meta["split"]["val_fraction"] == 0.25
    run = json.loads((encoded_run / "run" / "data.json").read_text())
    assert run["codebook"] == str((enc / "codebook").resolve())
    assert run["autoencoder"]["weights_sha256"] == meta["autoencoder"]["weights_sha256"]
    assert (encoded_run / "run" / "samples.png").is_file()


def test_encode_prints_readable_usage_with_the_mse_labelled(tmp_path, capsys):
    folder = _png_folder(tmp_path / "pngs")
    assert main(["encode", "--images", str(folder), "--autoencoder", "patches", "--patch", "2", "--image-size", "8",
                 "--channels", "1", "--num-codes", "6", "--val-fraction", "0.25", "--out", str(tmp_path / "enc"),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "val: held-out latent MSE" in out and "train: latent MSE on the vectors the codebook was fitted on" in out
    assert "perplexity" in out and "dead (never used)" in out and "the most used code takes" in out
    meta = json.loads((tmp_path / "enc" / "train" / "dataset.json").read_text())
    assert meta["grid"] == [4, 4] and meta["autoencoder"]["kind"] == "patches"


def test_sample_writes_pixel_images_through_the_recorded_autoencoder(encoded_run, tmp_path, capsys):
    png, each = tmp_path / "grid.png", tmp_path / "each"
    assert main(["sample", str(encoded_run / "run"), "--out", str(png), "--per-class", "2",
                 "--save-individual", str(each)]) == 0
    from PIL import Image

    files = sorted(each.glob("*.png"))
    assert [f.name for f in files[:3]] == ["00000-class0.png", "00001-class0.png", "00002-class1.png"]
    assert len(files) == 6 and Image.open(files[0]).size == (8, 8) and Image.open(files[0]).mode == "L"
    width, height = Image.open(png).size
    assert height > width  # 3 rows of 2


def test_eval_fid_writes_fid_and_reconstruction_fid(encoded_run, tmp_path, capsys):
    metrics_json = tmp_path / "m.json"
    assert main(["eval", str(encoded_run / "run"), "--fid", "--fid-steps", "5", "--samples-per-class", "3",
                 "--out", str(metrics_json)]) == 0
    out = capsys.readouterr().out
    assert "not comparable with published FIDs" in out
    m = json.loads(metrics_json.read_text())["eval"]
    for key in ("fid_guided", "fid_unguided", "fid_reconstruction", "fid_autoencoder", "kid_mean_guided",
                "class_consistency_guided", "judge_accuracy", "bits_per_code"):
        assert isinstance(m[key], float) and np.isfinite(m[key]), key
    assert m["fid_num_real"] == 6 and "FeatureNet" in m["fid_feature_network"]

    # The metrics go onto the card's model-index.
    card = tmp_path / "upload"
    assert main(["push", str(encoded_run / "run"), "--repo-id", "me/tiny", "--dry-run", str(card),
                 "--metrics", str(metrics_json), "--dataset-id", "tiny-pngs", "--license", "mit"]) == 0
    readme = (card / "README.md").read_text()
    assert "image folder" in readme  # the run's data names the data set on the card
    assert "FID, guided samples" in readme and "Reconstruction FID" in readme and "FeatureNet" in readme
    codebook_config = json.loads((card / "codebook" / "config.json").read_text())
    run = json.loads((encoded_run / "run" / "data.json").read_text())
    # The autoencoder (a local folder) ships in autoencoder/, recorded as this repo's; it samples offline.
    shipped = codebook_config["autoencoder"]
    assert shipped["weights_sha256"] == run["autoencoder"]["weights_sha256"]
    assert (shipped["source"], shipped["subfolder"]) == ("me/tiny", "autoencoder")
    assert (card / "autoencoder" / "diffusion_pytorch_model.safetensors").is_file()
    assert "shipped in `autoencoder/`" in readme
    assert main(["sample", str(card), "--out", str(tmp_path / "hub.png"), "--save-individual", str(tmp_path / "e"),
                 "--per-class", "1"]) == 0
    assert len(list((tmp_path / "e").glob("*.png"))) == 3


def test_a_different_autoencoder_is_refused(encoded_run, tmp_path, capsys):
    other = _tiny_vae(tmp_path / "other", seed=1)
    status = main(["sample", str(encoded_run / "run"), "--out", str(tmp_path / "s.png"), "--autoencoder", str(other)])
    err = capsys.readouterr().err
    assert status == 2 and "another autoencoder" in err and "weights_sha256" in err
    # One line (above it, at most the progress bar of loading the prior) and nothing written.
    last = err.rstrip().splitlines()[-1]
    assert last.startswith("codegpt sample: error: ") and "weights_sha256" in last
    assert not (tmp_path / "s.png").exists()


def test_bad_images_are_one_line_errors_naming_the_file_and_nothing_is_written(tmp_path, capsys):
    from PIL import Image

    folder = _png_folder(tmp_path / "pngs", n=6)
    Image.new("RGB", (10, 6)).save(folder / "a" / "odd.png")  # another size and mode
    patches = ["--autoencoder", "patches", "--image-size", "8", "--channels", "1", "--num-codes", "4", "--no-progress"]
    assert main(["encode", "--images", str(folder), *patches, "--resize", "refuse", "--out", str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err
    assert "odd.png" in err and "size 6x10" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o1" / "encoding.json").exists() and not (tmp_path / "o1" / "train").exists()

    (folder / "a" / "odd.png").write_bytes(b"not a png")
    assert main(["encode", "--images", str(folder), *patches, "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "odd.png" in err and "cannot read" in err and not (tmp_path / "o2" / "train").exists()

    (folder / "a" / "odd.png").unlink()
    assert main(["encode", "--images", str(folder), *patches, "--out", str(tmp_path / "o3")]) == 0
    # A codebook of another dimension than the autoencoder's latents (4 = 1 channel x 2 x 2).
    wrong = tmp_path / "o4"
    assert main(["encode", "--images", str(folder), *patches[:-3], "--channels", "1", "--patch", "4",
                 "--codebook", str(tmp_path / "o3" / "codebook"), "--out", str(wrong), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "codebook" in err and "latent_dim" in err and not wrong.exists()


def test_a_missing_label_column_is_named(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    data = datasets.Dataset.from_dict({"img": [Image.new("L", (8, 8))] * 4, "y": [0, 1, 0, 1]})
    data.save_to_disk(tmp_path / "ds")
    assert main(["encode", "--dataset", str(tmp_path / "ds"), "--image-column", "img", "--autoencoder", "patches",
                 "--image-size", "8", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "label_column 'label'" in err and "['img', 'y']" in err and not (tmp_path / "o").exists()


def test_a_prior_whose_seq_len_does_not_fit_the_latent_grid_is_refused(encoded_run, tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "codegpt", "vocab_size": 9, "seq_len": 9, "embed_dim": 16,
                                  "num_layers": 1, "num_heads": 2, "class_conditional": True, "num_classes": 3}))
    status = main(["train", "--data", str(encoded_run / "enc"), "--out", str(tmp_path / "run"),
                   "--config", str(config)])
    err = capsys.readouterr().err
    assert status == 2 and "seq_len" in err and not (tmp_path / "run").exists()


def test_eval_on_a_separate_test_set_encoded_with_the_training_codebook(encoded_run, tmp_path, capsys):
    test_images = _png_folder(tmp_path / "test", n=9)
    common = ["--images", str(test_images), "--autoencoder", str(encoded_run / "vae"), "--val-fraction", "0",
              "--no-progress"]
    # Another codebook than the model's: refused by name.
    assert main(["encode", *common, "--num-codes", "8", "--seed", "1", "--out", str(tmp_path / "own")]) == 0
    assert main(["eval", str(encoded_run / "run"), "--eval-data", str(tmp_path / "own"),
                 "--samples-per-class", "2"]) == 2
    assert "another codebook" in capsys.readouterr().err
    assert main(["encode", *common, "--codebook", str(encoded_run / "enc" / "codebook"),
                 "--out", str(tmp_path / "test_codes")]) == 0
    metrics_json = tmp_path / "m.json"
    assert main(["eval", str(encoded_run / "run"), "--eval-data", str(tmp_path / "test_codes"), "--fid",
                 "--fid-steps", "5", "--samples-per-class", "3", "--out", str(metrics_json)]) == 0
    m = json.loads(metrics_json.read_text())["eval"]
    assert m["fid_num_real"] == 9 and np.isfinite(m["fid_guided"]) and np.isfinite(m["bits_per_code"])


# --- integrity: verify, outputs that are never lost, one-line errors for flags ------------------------------


def test_verify_says_what_it_checked_and_names_the_damage(encoded_run, small_dataset, tmp_path, capsys):
    assert main(["verify", str(encoded_run / "enc")]) == 0
    out = capsys.readouterr().out
    assert out.count("intact: ") == 3 and "codebook" in out and "SHA-256 as recorded" in out
    assert str(encoded_run / "enc" / "val") in out

    assert main(["verify", str(small_dataset)]) == 0
    assert "24 items" in capsys.readouterr().out
    shard = small_dataset / "codes-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-30] ^= 1  # a code, still in range
    shard.write_bytes(bytes(data))
    assert main(["verify", str(small_dataset)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "codes-00000.safetensors" in err and "SHA-256" in err

    assert main(["verify", str(tmp_path)]) == 2
    assert "is not a code dataset" in capsys.readouterr().err


def test_verify_checks_a_training_run_and_names_a_damaged_checkpoint(encoded_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(encoded_run / "run", run)
    assert main(["verify", str(run)]) == 0
    out = capsys.readouterr().out
    assert out.count("intact: ") == 2 and "step-000003" in out and str(run / "model") in out  # checkpoint + model
    weights = run / "checkpoints" / "step-000003" / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 1  # a weight's low bits: the file still parses
    weights.write_bytes(bytes(data))
    assert main(["verify", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "step-000003" in err and "SHA-256" in err


def test_verify_of_a_dataset_without_records_says_it_cannot_tell(small_dataset, capsys):
    meta = json.loads((small_dataset / "dataset.json").read_text())
    for shard in meta["shards"]:
        del shard["bytes"], shard["sha256"]
    (small_dataset / "dataset.json").write_text(json.dumps(meta))
    assert main(["verify", str(small_dataset)]) == 0
    captured = capsys.readouterr()
    assert "no sizes or SHA-256 recorded" in captured.out and captured.err == ""


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def test_fit_codebook_refuses_a_non_empty_out_and_replaces_it_only_when_told_and_complete(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    file = tmp_path / "latents.safetensors"
    save_file({"latents": torch.randn(30, 2, 3, 4, generator=g), "labels": torch.arange(30) % 2}, str(file))
    out = tmp_path / "out"
    argv = ["fit-codebook", "--latents", str(file), "--out", str(out), "--num-codes", "8", "--no-progress"]
    assert main(argv) == 0
    before = _snapshot(out)

    assert main([*argv, "--num-codes", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err and "not empty" in err
    assert _snapshot(out) == before

    # Told to overwrite, but the new fit fails partway (more codes than vectors): the old output stays.
    assert main([*argv, "--num-codes", "1000", "--overwrite"]) == 2
    assert "num_codes" in capsys.readouterr().err
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latents.safetensors", "out"]

    assert main([*argv, "--num-codes", "4", "--overwrite-output-dir"]) == 0
    assert json.loads((out / "data" / "dataset.json").read_text())["codebook_size"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latents.safetensors", "out"]


def test_encode_refuses_a_non_empty_out_without_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    status = main(["encode", "--images", str(_png_folder(tmp_path / "pngs", n=6)), "--autoencoder", "patches",
                   "--image-size", "8", "--channels", "1", "--out", str(out), "--no-progress"])
    assert status == 2 and "--overwrite" in capsys.readouterr().err
    assert _snapshot(out) == {"notes.txt": b"mine"}


@pytest.fixture
def tiny_prior(tmp_path, small_dataset) -> Path:
    """A prior sized for ``small_dataset`` (16 codes, 4x4, 3 classes), saved in tmp_path/model."""
    from codegpt import GPT, GPTConfig

    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=17, seq_len=16, embed_dim=16, num_layers=1, num_heads=2, class_conditional=True,
                  num_classes=3)).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


BAD_FLAGS = [
    (["sample", "{model}", "--out", "{tmp}"], "--out"),  # a folder where a PNG goes
    (["sample", "{model}", "--codes-out", "{tmp}", "--out", "{tmp}/s.png"], "--codes-out"),
    (["sample", "{model}", "--seed", "-1", "--out", "{tmp}/s.png"], "--seed"),
    (["sample", "{model}", "--seed", str(2**70), "--out", "{tmp}/s.png"], "--seed"),
    (["sample", "{model}", "--per-class", "0", "--out", "{tmp}/s.png"], "--per-class"),
    (["sample", "{model}", "--codebook", "{tmp}/nowhere", "--out", "{tmp}/s.png"], "no such folder"),
    (["sample", "{model}", "--codebook", "org/not-a-folder", "--out", "{tmp}/s.png"], "no such folder"),
    (["sample", "{model}", "--device", "cuda:7", "--out", "{tmp}/s.png"], "--device"),
    (["sample", "{model}", "--device", "nonsense", "--out", "{tmp}/s.png"], "--device"),
    (["eval", "{model}", "--data", "{data}", "--samples-per-class", "0"], "--samples-per-class"),
    (["eval", "{model}", "--data", "{data}", "--split-seed", "-3"], "--split-seed"),
    (["eval", "{model}", "--data", "{data}", "--digits", "--codebook", "{tmp}/nowhere"], "no such folder"),
    (["eval", "{model}", "--data", "{data}", "--out", "{tmp}"], "--out"),
    (["fit-codebook", "--digits", "--out", "{data}/dataset.json"], "--out"),  # a file where a folder goes
    (["fit-codebook", "--digits", "--out", "{tmp}/new", "--seed", "-2"], "--seed"),
    (["fit-codebook", "--digits", "--out", "{tmp}/new", "--num-codes", "0"], "--num-codes"),
    (["fit-codebook", "--digits", "--out", "{tmp}/new", "--batch-size", "0"], "--batch-size"),
    (["fit-codebook", "--digits", "--out", "{tmp}/new", "--max-epochs", "0"], "--max-epochs"),
    (["fit-codebook", "--digits", "--out", "{tmp}/new", "--tol", "-1"], "--tol"),
    (["fit-codebook", "--digits", "--out", "{tmp}/new", "--num-threads", "0"], "--num-threads"),
    (["sample", "{model}", "--class-names", "a,b", "--out", "{tmp}/s.png"], "--class-names"),
]


@pytest.mark.parametrize("argv,names", BAD_FLAGS, ids=[f"{a[0]}-{n}-{i}" for i, (a, n) in enumerate(BAD_FLAGS)])
def test_bad_flags_are_one_line_naming_the_flag_and_nothing_is_written(tiny_prior, small_dataset, tmp_path, capsys,
                                                                         argv, names):
    if "cuda:7" in argv and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    before = _snapshot(tmp_path)
    argv = [a.format(model=tiny_prior, data=small_dataset, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and names in err, err
    assert _snapshot(tmp_path) == before


def test_a_bug_keeps_its_traceback(tiny_prior, tmp_path, monkeypatch):
    # Only user errors become one line: anything else is a bug to report, with its traceback.
    import codegpt.cli as cli

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in codegpt")

    monkeypatch.setattr(cli, "sample_classes", broken)
    with pytest.raises(RuntimeError, match="a bug in codegpt"):
        main(["sample", str(tiny_prior), "--out", str(tmp_path / "s.png")])


# --- flags as transformers users spell them, every default shown, bars and threads ---------------------------


def _commands():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_every_long_flag_of_every_command_takes_both_spellings():
    for name, command in _commands().items():
        for action in command._actions:
            for flag in (f for f in action.option_strings if f.startswith("--")):
                for other in ("--" + flag[2:].replace("-", "_"), "--" + flag[2:].replace("_", "-")):
                    assert command._option_string_actions.get(other) is action, (name, flag, other)


def test_transformers_spellings_parse_to_the_same_values():
    parser = build_parser()
    ours = parser.parse_args(["train", "--data", "d", "--out", "o", "--steps", "5", "--lr", "0.01", "--batch-size",
                              "4", "--save-every", "3", "--eval-every", "2", "--log-every", "1", "--no-progress"])
    theirs = parser.parse_args(["train", "--data", "d", "--output_dir", "o", "--max_steps", "5", "--learning_rate",
                                "0.01", "--per_device_train_batch_size", "4", "--save_steps", "3", "--eval_steps", "2",
                                "--logging_steps", "1", "--no_progress"])
    assert vars(ours) == vars(theirs)
    fit = parser.parse_args(["fit-codebook", "--digits", "--output_dir", "o", "--num_codes", "4", "--max_epochs", "3",
                             "--batch_size", "9", "--no_progress", "--num_threads", "1"])
    assert (fit.out, fit.num_codes, fit.max_epochs, fit.batch_size, fit.no_progress, fit.num_threads) == (
        "o", 4, 3, 9, True, 1)
    sample = parser.parse_args(["sample", "m", "--per_class", "2", "--top_k", "3", "--class_names", "a,b"])
    assert (sample.per_class, sample.top_k, sample.class_names) == (2, 3, ["a", "b"])
    demo = parser.parse_args(["demo", "--output_dir", "x", "--max_steps", "7"])
    assert (str(demo.out_dir), demo.steps) == ("x", 7)
    # An abbreviation matching both spellings of one flag is no ambiguity.
    assert parser.parse_args(["sample", "m", "--per", "3"]).per_class == 3


def test_help_states_every_default():
    for name, command in _commands().items():
        formatter = command._get_formatter()
        for action in command._actions:
            if action.default in (None, argparse.SUPPRESS) or action.help == argparse.SUPPRESS:
                continue
            text = " ".join(formatter._format_action(action).split())
            assert "default" in text, (name, action.option_strings, text)
    # The shape flags of `train` have no default of their own (a resume takes the checkpoint's): their help
    # says what leaving them out means.
    help_text = " ".join(_commands()["train"].format_help().split())
    assert "(default: the checkpoint's with --resume, else 256)" in help_text  # --embed-dim
    assert "(default: as `accelerate launch` is configured, else no)" in help_text  # --mixed-precision


def _bar_marks(text: str) -> list[str]:
    return [mark for mark in ("%|", "it/s", "step/s", "batch/s", "\u2588") if mark in text]


def test_no_progress_and_tqdm_disable_silence_every_bar(small_dataset, tmp_path, capfd, monkeypatch):
    import huggingface_hub.utils as hub_utils

    import codegpt.cli as cli

    argv = ["train", "--data", str(small_dataset), "--steps", "2", "--batch-size", "8", "--embed-dim", "16",
            "--layers", "1", "--heads", "2", "--samples-per-class", "1", "--save-every", "1", "--no-estimate"]
    assert main([*argv, "--out", str(tmp_path / "shown")]) == 0
    assert _bar_marks(capfd.readouterr().err)  # the check below can fail: by default the bar shows

    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert main([*argv, "--out", str(tmp_path / "run")]) == 0
    assert _bar_marks(capfd.readouterr().err) == []
    monkeypatch.delenv("TQDM_DISABLE")

    # Loading the model and saving it anew (the Hub's bars must be off while it runs, and on again after).
    hub_utils.enable_progress_bars()
    seen = []
    prepare = cli.prepare_upload_folder
    monkeypatch.setattr(cli, "prepare_upload_folder",
                        lambda *a, **k: seen.append(hub_utils.are_progress_bars_disabled()) or prepare(*a, **k))
    assert main(["push", str(tmp_path / "run"), "--repo-id", "me/x", "--dry-run", str(tmp_path / "up"),
                 "--dataset-id", "toy", "--decoder", "one colour per code", "--no-progress"]) == 0
    assert seen == [True] and not hub_utils.are_progress_bars_disabled()
    assert main(["sample", str(tmp_path / "run"), "--out", str(tmp_path / "s.png"), "--no-progress"]) == 0
    assert _bar_marks(capfd.readouterr().err) == []


def test_num_threads_applies_to_the_command_only(tiny_prior, tmp_path, monkeypatch):
    import os

    import codegpt.cli as cli

    before, seen = torch.get_num_threads(), []
    sample = cli.sample_classes
    monkeypatch.setattr(cli, "sample_classes", lambda *a, **k: seen.append(
        (torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS"))) or sample(*a, **k))
    assert main(["sample", str(tiny_prior), "--out", str(tmp_path / "s.png"), "--num-threads", "1"]) == 0
    assert seen == [(1, "1")] and torch.get_num_threads() == before


def test_the_cpu_preset_sets_defaults_and_given_flags_win():
    from codegpt.cli import PRESETS, _parse

    args = _parse(["train", "--data", "d", "--out", "o", "--preset", "cpu-small"])
    for name, value in PRESETS["cpu-small"].items():
        assert getattr(args, name) == value, name
    args = _parse(["train", "--data", "d", "--out", "o", "--preset", "cpu-small", "--max-steps", "7", "--heads", "2"])
    assert (args.max_steps, args.num_heads, args.embed_dim) == (7, 2, 64)
    assert _parse(["train", "--data", "d", "--out", "o"]).max_steps == 1000


def test_the_duration_estimate_leaves_the_run_as_it_would_be(small_dataset, tmp_path, capsys):
    argv = ["train", "--data", str(small_dataset), "--steps", "3", "--batch-size", "8", "--embed-dim", "16",
            "--layers", "1", "--heads", "2", "--dropout", "0.1", "--samples-per-class", "1", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"estimate: (about \d+\.\d|less than 0\.1) min for 3 steps", out), out
    assert main([*argv, "--out", str(tmp_path / "b"), "--no-estimate"]) == 0
    assert "estimate:" not in capsys.readouterr().out
    a, b = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    def records(run: str) -> list[dict]:  # the log, but for the wall-clock speed
        lines = (tmp_path / run / "log.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_second"} for line in lines]

    assert records("a") == records("b") and len(records("a")) >= 2  # a training and an evaluation record
    assert (tmp_path / "a" / "samples.png").read_bytes() == (tmp_path / "b" / "samples.png").read_bytes()


def test_fit_codebook_takes_the_k_means_settings(tmp_path, capsys):
    file = tmp_path / "latents.safetensors"
    save_file({"latents": torch.randn(30, 2, 3, 4, generator=torch.Generator().manual_seed(0))}, str(file))
    argv = ["fit-codebook", "--latents", str(file), "--num-codes", "8", "--batch-size", "7", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "a"), "--max-epochs", "2", "--tol", "0"]) == 0
    captured = capsys.readouterr()
    assert "after 2 epochs (of at most 2)" in captured.out and captured.err == ""
    assert main([*argv, "--out", str(tmp_path / "b"), "--tol", "1e9"]) == 0
    assert re.search(r"converged after \d epochs? \(of at most 100\)", capsys.readouterr().out)


def test_push_names_every_bad_flag_at_once(tiny_prior, tmp_path, capsys):
    before = _snapshot(tmp_path)
    assert main(["push", str(tiny_prior), "--repo-id", "not a repo!", "--license", "MIT", "--class-names", "a,b",
                 "--grid", "3x3", "--top-p", "2", "--dry-run", str(tmp_path / "up")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "6 problems" in err, err
    for flag in ("--repo-id", "--license", "--class-names", "--grid", "top_p", "--decoder"):
        assert flag in err, flag
    assert _snapshot(tmp_path) == before


def test_sample_grids_carry_class_names(tiny_prior, tmp_path):
    from PIL import Image

    from codegpt.runs import save_image_grid

    plain, named = tmp_path / "plain.png", tmp_path / "named.png"
    argv = ["sample", str(tiny_prior), "--per-class", "2", "--seed", "3"]
    assert main([*argv, "--out", str(plain)]) == 0
    assert main([*argv, "--out", str(named), "--class-names", "cat,dog,bird"]) == 0
    plain, named = np.asarray(Image.open(plain)), np.asarray(Image.open(named))
    margin = named.shape[1] - plain.shape[1]
    assert named.shape[0] == plain.shape[0] and margin > 0
    assert np.array_equal(named[:, margin:], plain)  # the samples as they were, a margin on their left
    rows = np.array_split(named[:, :margin].min(axis=2), 3)  # one band per class
    assert all((band < 100).any() for band in rows)  # ink in every row's label

    images = np.random.default_rng(0).random((4, 3, 3))
    a = np.asarray(Image.open(save_image_grid(images, tmp_path / "a.png", rows=2, row_labels=["cat", "dog"])))
    b = np.asarray(Image.open(save_image_grid(images, tmp_path / "b.png", rows=2, row_labels=["dog", "cat"])))
    assert a.shape == b.shape and not np.array_equal(a, b)
    with pytest.raises(ValueError, match="row_labels"):
        save_image_grid(images, tmp_path / "c.png", rows=2, row_labels=["cat"])


def test_sample_labels_rows_with_the_recorded_dataset_class_names(encoded_run, tmp_path):
    from PIL import Image

    argv = ["sample", str(encoded_run / "run"), "--per-class", "1"]
    assert main([*argv, "--out", str(tmp_path / "named.png")]) == 0  # the data records a, b, c
    assert main([*argv, "--out", str(tmp_path / "other.png"), "--class-names", "x,y,z"]) == 0
    named, other = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("named", "other"))
    assert named.shape == other.shape and not np.array_equal(named, other)
