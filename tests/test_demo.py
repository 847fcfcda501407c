"""`codegpt demo`: the whole pipeline (autoencoder -> codebook -> prior -> decoded samples -> metrics)
with tiny settings in seconds, and the settings' checks."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import reset_accelerate
from PIL import Image

from codegpt.cli import main
from codegpt.demo import DemoSettings, run_demo
from codegpt.images import decode_codes, load_encoding

pytest.importorskip("diffusers")
pytest.importorskip("torchmetrics")

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

TINY = ["--steps", "20", "--batch-size", "32", "--embed-dim", "32", "--layers", "1", "--heads", "2",
        "--samples-per-class", "4", "--grid-columns", "3", "--feature-steps", "20", "--no-progress"]


@pytest.fixture(scope="module")
def kl_demo(tmp_path_factory):
    """The default demo (a trained AutoencoderKL) with a toy autoencoder, prior and feature network."""
    out = tmp_path_factory.mktemp("demo")
    reset_accelerate()  # module-scoped: set up before the per-test reset
    assert main(["demo", "--out", str(out), "--ae-steps", "30", "--ae-width", "8", *TINY]) == 0
    return out


def _check_grid(png, columns: int) -> None:
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = Image.open(png).size
    assert height > width * 10 / columns * 0.9  # 10 rows (classes) of `columns` images


def test_demo_writes_decoded_images_and_metrics(kl_demo, capsys):
    _check_grid(kl_demo / "samples.png", 3)
    report = json.loads((kl_demo / "metrics.json").read_text())
    m = report["eval"]
    for key in ("bits_per_code", "baseline_bits_per_code", "bits_ratio", "class_consistency_guided",
                "class_consistency_unguided", "judge_accuracy", "judge_accuracy_real", "novelty_guided",
                "codebook_mse", "autoencoder_mse", "fid_guided", "fid_unguided", "fid_reconstruction",
                "fid_autoencoder_only", "fid_real_train_vs_val"):
        assert isinstance(m[key], float), key
    assert m["judge_accuracy_real"] >= 0.98  # the judge on real digits does not depend on the toy models
    assert m["fid_reconstruction"] >= 0 and m["fid_guided"] >= 0
    assert "trained on 1438 real images" in m["feature_network"]  # the digits feature network, named
    assert report["autoencoder"]["class"] == "AutoencoderKL"
    assert set(report["targets_met"]) == {"bits_ratio", "class_consistency_guided", "class_consistency_unguided",
                                          "judge_accuracy", "novelty", "all_distinct", "codebook_mse", "wall_seconds"}
    assert report["split"] == {"train": 1438, "val": 359, "seed": 0}
    assert set(report["cpu_seconds"]) == set(report["timing_seconds"])  # each stage's CPU time beside its wall time
    assert (kl_demo / "run" / "model" / "config.json").is_file()


def test_demo_codes_decode_with_the_recorded_autoencoder(kl_demo):
    # The codes folder records the saved autoencoder: loaded back, it decodes as the demo's own did.
    record, codebook, autoencoder = load_encoding(kl_demo / "codes")
    assert record["autoencoder"]["source"] == str((kl_demo / "autoencoder").resolve())
    assert record["split"]["num_val"] == 359
    run_data = json.loads((kl_demo / "run" / "data.json").read_text())
    assert run_data["autoencoder"]["weights_sha256"] == record["autoencoder"]["weights_sha256"]
    codes = torch.randint(codebook.num_codes, (5, 4, 4), generator=torch.Generator().manual_seed(0))
    images = decode_codes(codes, codebook, autoencoder)
    assert images.shape == (5, 1, 8, 8) and 0 <= float(images.min()) <= float(images.max()) <= 1


def test_demo_patches_keeps_the_patch_path(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--autoencoder", "patches", *TINY]) == 0
    _check_grid(tmp_path / "samples.png", 3)
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["autoencoder"]["kind"] == "patches"
    # The patch codebook reconstructs the held-out digits as well as it always did, toy prior or not.
    assert report["eval"]["codebook_mse"] <= 1.0 and report["eval"]["judge_accuracy"] >= 0.98
    assert (tmp_path / "codebook" / "model.safetensors").is_file() and (tmp_path / "data").is_dir()
    assert not (tmp_path / "autoencoder").exists()
    assert "through the patch codebook" in capsys.readouterr().out


@pytest.mark.parametrize("bad, needle", [
    ({"autoencoder": "vq"}, "autoencoder must be one of"),
    ({"ae_steps": 0}, "ae_steps"),
    ({"val_fraction": 0.0}, "val_fraction"),
    ({"samples_per_class": 2, "grid_columns": 3}, "grid_columns"),
])
def test_demo_settings_refuse_bad_values(bad, needle, tmp_path):
    with pytest.raises(ValueError, match=needle):
        DemoSettings(out_dir=tmp_path, **bad)


def test_demo_prior_steps_default_per_autoencoder(tmp_path):
    # The patch demo keeps the steps its figures were measured with; a given value always wins.
    assert DemoSettings(out_dir=tmp_path, autoencoder="patches").steps == 1000
    assert DemoSettings(out_dir=tmp_path, autoencoder="kl", steps=1000).steps == 1000
    with pytest.raises(ValueError, match="steps"):
        DemoSettings(out_dir=tmp_path, steps=0)


def test_demo_refuses_a_bad_flag_in_one_line(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--autoencoder", "vq"]) == 2
    assert "autoencoder must be one of" in capsys.readouterr().err
    with pytest.raises(TypeError):
        run_demo("not settings")  # type: ignore[arg-type]
