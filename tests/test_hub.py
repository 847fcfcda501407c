"""Sharing a prior: the model card, the exact upload folder (``--dry-run``), the push, the codebook.

Nothing here reaches a network: the push goes to a fake ``HfApi`` that records what it was given.
Loading the folder as remote code in a fresh process is in ``test_remote_code.py``.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_config, make_model
from huggingface_hub import HfApi, ModelCard
from transformers import GenerationConfig

from codegpt import GPT, GPTConfig
from codegpt._util import read_json
from codegpt.cli import main
from codegpt.codebook import Codebook
from codegpt.hub import (
    CardInfo,
    SamplingSettings,
    eval_sampling_text,
    load_codebook,
    prepare_upload_folder,
    push_to_hub,
    render_model_card,
    select_metrics,
    upload_file_names,
)
from codegpt.runs import resolve_run

REPO_ID = "toy-org/toy-prior"
TOKEN = "hf_dummyTokenThatMustNeverBeWritten0123456789"
SHA = "0123456789abcdef0123456789abcdef01234567"
MODEL_FILES = [
    "README.md",
    "config.json",
    "configuration_codegpt.py",
    "generation_config.json",
    "model.safetensors",
    "modeling_codegpt.py",
]
CODEBOOK_FILES = ["codebook/config.json", "codebook/model.safetensors"]


def tiny_codebook(num_codes: int = 16) -> Codebook:
    g = torch.Generator().manual_seed(0)
    return Codebook.fit(torch.randn(400, 4, generator=g), num_codes, seed=0, progress=False)


INFO = CardInfo(
    dataset_id="toy-codes",
    dataset_name="Toy codes",
    class_names=["cat", "dog", "bird"],
    description="A tiny prior for tests.",
)
METRICS = {"step": 500, "loss_nats": 1.75, "bits_per_code": 1.75 / math.log(2), "num_codes": 4096}


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A save_pretrained folder with what a training checkpoint keeps next to it."""
    root = tmp_path_factory.mktemp("ckpt")
    make_model().save_pretrained(root)
    # Accelerate state and other files that must never be uploaded.
    torch.save({"state": {}}, root / "optimizer.bin")
    (root / "scheduler.bin").write_bytes(b"x")
    (root / "random_states_0.pkl").write_bytes(b"x")
    (root / "trainer_state.json").write_text("{}")
    (root / "notes.txt").write_text(f"token={TOKEN}")
    return root


@pytest.fixture(scope="module")
def codebook_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("codebook")
    tiny_codebook().save_pretrained(root)
    return root


# ---------------------------------------------------------------------------------------------
# The card
# ---------------------------------------------------------------------------------------------


def make_card(**overrides) -> ModelCard:
    kwargs = dict(
        repo_id=REPO_ID,
        info=INFO,
        metrics=METRICS,
        training_args={"learning_rate": 3e-4, "max_steps": 500, "output_dir": "/home/alice/run"},
        codebook=tiny_codebook(),
        sampling=SamplingSettings(temperature=1.0, top_k=8, guidance_scale=3.0),
        num_parameters=12345,
    )
    kwargs.update(overrides)
    config = kwargs.pop("config", None) or make_config()
    return render_model_card(config, **kwargs)


def test_card_metadata_parses_with_the_run_metrics_in_model_index():
    text = str(make_card())
    meta = front_matter(text)
    assert meta["license"] == "apache-2.0"
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "unconditional-image-generation"
    assert {"class-conditional", "image-tokens", "custom_code"} <= set(meta["tags"])
    assert (meta["codebook_size"], meta["seq_len"], meta["grid"], meta["num_classes"]) == (16, 16, [4, 4], 3)
    assert meta["datasets"] == ["toy-codes"]
    assert meta["metrics"] == ["bits_per_code", "loss_nats"]

    # huggingface_hub's own parser reads the evaluation results back.
    card = ModelCard(text, ignore_metadata_errors=False)
    results = {r.metric_type: r for r in card.data.eval_results}
    assert set(results) == {"bits_per_code", "loss_nats"}
    assert results["bits_per_code"].metric_value == pytest.approx(1.75 / math.log(2))
    assert results["loss_nats"].metric_value == pytest.approx(1.75)
    for r in results.values():
        assert (r.dataset_type, r.dataset_name, r.dataset_split) == ("toy-codes", "Toy codes", "validation")
        assert r.task_type == "unconditional-image-generation"
    assert card.data.model_name == "toy-prior"


def test_card_body_says_how_to_load_sample_and_decode():
    text = make_card().text
    assert f'from_pretrained(\n    "{REPO_ID}",' in text
    assert "trust_remote_code=True" in text and "runs this repository's Python code" in text
    assert 'revision="main",  # pin a commit sha' in text
    assert "temperature 1, top-k 8, top-p off, guidance scale 3" in text  # generation_config.json
    assert "guidance_scale=1.0" in text and "guidance_scale=3.0" in text  # without and with guidance
    assert "do_sample=False" in text
    assert "| 1 | dog |" in text  # class names
    assert "16 centroids of dimension\n4" in text or "16 centroids of dimension 4" in text
    assert 'load_codebook("toy-org/toy-prior"' in text
    assert "tested with transformers 4.57.6 and 5.24.0" in text
    assert "Measured on **Toy codes**." in text and "| Bits per code | 2.525 | validation |" in text
    assert "| `learning_rate` | 0.0003 |" in text
    assert "/home/alice" not in text  # operational arguments (output_dir) stay off the card
    assert "{{" not in text and "{%" not in text


def test_card_pins_a_given_revision():
    text = make_card(revision=SHA).text
    assert f'revision="{SHA}",\n' in text
    assert "pin a commit sha" not in text


def test_unconditional_card_without_metrics_or_codebook():
    card = make_card(
        config=make_config(class_conditional=False),
        info=CardInfo(decoder="Decode with the VQGAN of org/vqgan at revision abc."),
        metrics=None,
        training_args=None,
        codebook=None,
        sampling=SamplingSettings(temperature=0.8),
    )
    meta = front_matter(str(card))
    assert "class-conditional" not in meta["tags"] and "model-index" not in meta
    assert "datasets" not in meta and "metrics" not in meta
    assert "Decode with the VQGAN of org/vqgan" in card.text
    assert "classes=" not in card.text and "guidance" not in card.text.split("## Sample")[1].split("##")[0]
    assert "No evaluation results were given" in card.text
    assert "Training settings were not recorded" in card.text


def test_secrets_in_training_args_never_reach_the_card():
    text = str(make_card(training_args={"hub_token": TOKEN, "api_key": "k", "note": TOKEN, "lr": 1e-3}))
    assert TOKEN not in text and "api_key" not in text
    assert "| `lr` | 0.001 |" in text


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"info": CardInfo(license="Apache 2.0", dataset_id="d")}, ValueError, "license must be"),
        ({"info": CardInfo()}, ValueError, "dataset_id: evaluation results need"),
        ({"metrics": {"step": 3, "epoch": 1}}, ValueError, "holds no quality metric"),
        ({"metrics": {"bits_per_code": float("nan")}}, ValueError, "bits_per_code.*finite"),
        ({"metrics": {"fid": 3.0}}, ValueError, "eval_sampling: the sample-based metrics \\['fid'\\] need"),
        ({"info": CardInfo(dataset_id="d", class_names=["a"])}, ValueError, "class_names must be 3"),
        ({"info": CardInfo(dataset_id="d", grid_shape=(2, 4))}, ValueError, "grid_shape 2x4 = 8 codes.*16"),
        ({"codebook": None}, ValueError, "decoder: a card must say what turns the codes into pixels"),
        ({"codebook": tiny_codebook(8)}, ValueError, "codebook has 8 codes.*codebook_size is 16"),
        ({"repo_id": "a/b/c"}, ValueError, "repo_id 'a/b/c' is not a valid Hub repo id"),
        ({"repo_id": 5}, TypeError, "repo_id must be a str"),
        ({"revision": 'main", trust_remote_code=True) #'}, ValueError, "revision must be a branch"),
        ({"sampling": SamplingSettings(temperature=-1)}, ValueError, "temperature must be"),
        ({"sampling": SamplingSettings(top_k=2.5)}, ValueError, "top_k must be"),
        ({"sampling": SamplingSettings(top_p=0)}, ValueError, "top_p must be"),
        ({"training_args": {"x": object()}}, TypeError, "training_args\\['x'\\] must be JSON"),
        ({"info": "apache-2.0"}, TypeError, "info must be a CardInfo"),
        (
            {
                "config": GPTConfig(vocab_size=17, seq_len=16, embed_dim=8, num_layers=1, num_heads=2),
                "sampling": SamplingSettings(guidance_scale=2.0),
                "metrics": None,
                "info": CardInfo(),
            },
            ValueError,
            "guidance_scale=2.0 needs a class-conditional model",
        ),
    ],
)
def test_bad_card_inputs_raise_clear_errors(overrides, error, match):
    with pytest.raises(error, match=match):
        make_card(**overrides)


def test_bad_templates_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="template_path: no such file"):
        make_card(template_path=tmp_path / "missing.md")
    (tmp_path / "undefined.md").write_text("---\n{{ card_data }}\n---\n{{ no_such_value }}\n")
    with pytest.raises(ValueError, match="no_such_value"):
        make_card(template_path=tmp_path / "undefined.md")
    (tmp_path / "syntax.md").write_text("---\n{{ card_data }}\n---\n{% if %}\n")
    with pytest.raises(ValueError, match="line 4"):
        make_card(template_path=tmp_path / "syntax.md")
    (tmp_path / "nometa.md").write_text("# {{ model_name }}\n")
    with pytest.raises(ValueError, match="card_data"):
        make_card(template_path=tmp_path / "nometa.md")


def test_sample_based_metrics_state_their_sampling_settings():
    demo_like = {  # the shape of `codegpt demo`'s metrics.json
        "eval": {
            "bits_per_code": 2.1,
            "class_consistency_guided": 1.0,
            "novelty_unguided": 0.99,
            "all_distinct_guided": True,
        },
        "settings": {"samples_per_class": 100, "guidance_scale": 2.0},
        "timing_seconds": {"total": 50.0},
    }
    text = str(make_card(metrics=demo_like))
    assert "temperature 1, top-k off, 100 samples per class; guided figures at guidance scale 2" in text
    assert "| Class consistency, guided samples (judged) | 1 | validation |" in text
    meta = front_matter(text)
    assert meta["metrics"] == ["bits_per_code", "class_consistency_guided", "novelty_unguided"]
    explicit = make_card(metrics={"fid": 3.0}, eval_sampling="temperature 1, guidance 4, 50k samples").text
    assert "Sampling settings behind sample-based numbers: temperature 1, guidance 4, 50k samples." in explicit


def test_select_metrics_reads_flat_nested_and_history_records():
    flat = select_metrics({"eval_bits_per_code": 2.0, "test_fid": 9.5, "step": 3, "train_loss": 1.0})
    assert [(m.key, m.split, m.value) for m in flat] == [("fid", "test", 9.5), ("bits_per_code", "validation", 2.0)]
    nested = select_metrics({"final": {"bits_per_code": 1.5}, "seed": 0})
    assert [(m.key, m.value) for m in nested] == [("bits_per_code", 1.5)]
    history = select_metrics({"history": [{"step": 1, "bits_per_code": 3.0}, {"step": 2, "bits_per_code": 2.5}]})
    assert [(m.key, m.value) for m in history] == [("bits_per_code", 2.5)]
    assert select_metrics(METRICS)[0].name == "Bits per code"
    with pytest.raises(TypeError, match="metrics must be a mapping"):
        select_metrics([1, 2])


def test_sampling_settings_make_valid_generation_configs():
    for settings, expected in [
        (SamplingSettings(), {"do_sample": True, "temperature": 1.0, "top_k": 0}),
        (SamplingSettings(temperature=0), {"do_sample": False}),
        (SamplingSettings(temperature=0, guidance_scale=2), {"do_sample": False, "guidance_scale": 2.0}),
        (
            SamplingSettings(top_k=5, top_p=0.9, guidance_scale=1),
            {"do_sample": True, "temperature": 1.0, "top_k": 5, "top_p": 0.9},
        ),
    ]:
        assert settings.generation_kwargs() == expected
        GenerationConfig(**expected).validate(strict=True)  # what save_pretrained would refuse


# ---------------------------------------------------------------------------------------------
# The upload folder (--dry-run)
# ---------------------------------------------------------------------------------------------


def run_cli(*argv: str) -> int:
    return main(["push", *map(str, argv)])


def test_dry_run_writes_exactly_the_upload_files(checkpoint, codebook_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "upload"
    code = run_cli(
        checkpoint,
        "--repo-id",
        REPO_ID,
        "--dry-run",
        out,
        "--codebook",
        codebook_dir,
        "--dataset-id",
        "toy-codes",
        "--class-names",
        "cat,dog,bird",
        "--temperature",
        "0.9",
        "--top-k",
        "8",
        "--guidance-scale",
        "2",
    )
    assert code == 0
    assert files_under(out) == sorted(MODEL_FILES + CODEBOOK_FILES) == upload_file_names(True)
    assert "codebook/model.safetensors" in capsys.readouterr().out
    # No temporary folder is left next to it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["upload"]
    for path in out.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
            assert str(checkpoint).encode() not in path.read_bytes(), path  # nor a local path

    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_codegpt.GPTConfig",
        "AutoModel": "modeling_codegpt.GPT",
        "AutoModelForCausalLM": "modeling_codegpt.GPT",
    }
    gen = json.loads((out / "generation_config.json").read_text())
    assert {k: gen.get(k) for k in ("do_sample", "temperature", "top_k", "guidance_scale")} == {
        "do_sample": True,
        "temperature": 0.9,
        "top_k": 8,
        "guidance_scale": 2.0,
    }
    assert (gen["suppress_tokens"], gen["bos_token_id"], gen["max_length"]) == ([16], 16, 17)
    card = ModelCard((out / "README.md").read_text())
    assert card.data.to_dict()["library_name"] == "transformers"

    # The folder is the model: same weights, and the codebook decodes.
    original, loaded = GPT.from_pretrained(checkpoint), GPT.from_pretrained(out)
    saved = loaded.state_dict()
    assert saved.keys() == original.state_dict().keys()
    for name, tensor in original.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    codes = torch.tensor([[0, 5], [15, 3]])
    assert torch.equal(load_codebook(out).decode(codes), Codebook.from_pretrained(codebook_dir).decode(codes))


def test_dry_run_refuses_a_non_empty_folder_unless_overwrite(checkpoint, tmp_path, capsys):
    out = tmp_path / "upload"
    out.mkdir()
    (out / "old.bin").write_bytes(b"old")
    argv = [checkpoint, "--repo-id", REPO_ID, "--dry-run", out, "--decoder", "Decode with org/vq."]
    assert run_cli(*argv) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert run_cli(*argv, "--overwrite") == 0
    assert files_under(out) == MODEL_FILES  # the old file went with the old folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["upload"]


def test_bad_inputs_write_nothing(checkpoint, codebook_dir, tmp_path, capsys):
    bad_json = tmp_path / "metrics.json"
    bad_json.write_text("{not json")
    cases = [
        ([tmp_path / "nowhere"], "model_dir: no such directory"),
        ([tmp_path], "holds no model"),
        ([checkpoint, "--metrics", tmp_path / "missing.json"], "--metrics: no such file"),
        ([checkpoint, "--metrics", bad_json], "is not valid JSON"),
        ([checkpoint, "--codebook", tmp_path / "nocb"], "codebook_dir: no such directory"),
        ([checkpoint], "decoder: a card must say"),
        ([codebook_dir], "holds a None model, not a 'codegpt' one"),
        ([checkpoint, "--codebook", codebook_dir, "--grid", "3x3"], "grid_shape 3x3"),
        ([checkpoint, "--codebook", codebook_dir, "--temperature", "-1"], "temperature must be"),
        ([checkpoint, "--codebook", codebook_dir, "--license", "Apache 2"], "license must be"),
    ]
    for argv, message in cases:
        out = tmp_path / "out"
        assert run_cli(*argv, "--repo-id", REPO_ID, "--dry-run", out) == 2, message
        err = capsys.readouterr().err
        assert message in err, (message, err)
        assert not out.exists()
    with pytest.raises(SystemExit):  # a token is never taken on the command line
        run_cli(checkpoint, "--repo-id", REPO_ID, "--token", TOKEN)


def test_read_json_errors_name_the_argument(tmp_path):
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(ValueError, match="--metrics: .* must hold a JSON object, got list"):
        read_json(tmp_path / "list.json", "--metrics")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="holds no record"):
        read_json(tmp_path / "empty.jsonl", "--metrics")
    (tmp_path / "log.jsonl").write_text('{"step": 1, "bits_per_code": 3}\n{"step": 2, "bits_per_code": 2}\n')
    assert read_json(tmp_path / "log.jsonl", "--metrics") == {"step": 2, "bits_per_code": 2}


# ---------------------------------------------------------------------------------------------
# A real training run folder
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """Two steps of codegpt.training on random codes: the real run folder layout."""
    from codegpt.training import TrainingArguments, train

    g = torch.Generator().manual_seed(0)
    config = make_config()

    def items(n):
        out = []
        for _ in range(n):
            ids = torch.randint(0, 16, (17,), generator=g)
            ids[0] = 16
            labels = ids.clone()
            labels[0] = -100
            out.append({"input_ids": ids, "labels": labels, "classes": torch.randint(0, 3, (), generator=g)})
        return out

    root = tmp_path_factory.mktemp("run") / "run"
    args = TrainingArguments(
        output_dir=root,
        max_steps=2,
        per_device_batch_size=4,
        warmup_steps=0,
        save_every=1,
        eval_every=1,
        samples_per_class=1,
        sample_temperature=0.7,
        sample_guidance_scale=1.5,
        progress=False,
    )
    train(args, config, items(16), items(4))
    return root


def test_push_from_a_training_run_takes_its_model_metrics_and_arguments(run_dir, codebook_dir, tmp_path):
    files = resolve_run(run_dir)
    assert files.model_dir == run_dir / "model"
    assert files.metrics["step"] == 2 and "bits_per_code" in files.metrics
    assert files.training_args["max_steps"] == 2

    checkpoint = sorted((run_dir / "checkpoints").iterdir())[-1]
    from_checkpoint = resolve_run(checkpoint)
    assert from_checkpoint.model_dir == checkpoint / "model"
    assert from_checkpoint.metrics["step"] == int(checkpoint.name.split("-")[1])
    assert resolve_run(checkpoint / "model").metrics == from_checkpoint.metrics

    out = tmp_path / "upload"
    assert (
        run_cli(
            run_dir, "--repo-id", REPO_ID, "--dry-run", out, "--codebook", codebook_dir, "--dataset-id", "toy-codes"
        )
        == 0
    )
    assert files_under(out) == sorted(MODEL_FILES + CODEBOOK_FILES)
    gen = json.loads((out / "generation_config.json").read_text())
    # The run's own sample settings become the recommended ones.
    assert (gen["temperature"], gen["guidance_scale"], gen["top_k"]) == (0.7, 1.5, 0)
    card = ModelCard((out / "README.md").read_text())
    [result] = card.data.eval_results[:1]
    assert result.metric_type == "bits_per_code"
    assert result.metric_value == pytest.approx(files.metrics["bits_per_code"])
    assert "| `max_steps` | 2 |" in card.text
    assert str(run_dir) not in card.text


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("conditional", [True, False])
def test_eval_out_is_what_push_metrics_reads(conditional, learnable_dataset, tmp_path, capsys):
    learnable_dataset(tmp_path / "data")  # 2x4 codes of 16, 3 classes
    model_dir = tmp_path / "model"
    make_model(seq_len=8, class_conditional=conditional).save_pretrained(model_dir)
    recorded = tmp_path / "eval.json"
    assert main(["eval", str(model_dir), "--data", str(tmp_path / "data"), "--samples-per-class", "2",
                 "--guidance-scale", "1.5", "--out", str(recorded), "--device", "cpu"]) == 0
    upload = tmp_path / "upload"
    # No --eval-sampling: the file says how its sample-based figures were drawn.
    assert run_cli(model_dir, "--repo-id", REPO_ID, "--dry-run", upload, "--metrics", recorded,
                   "--dataset-id", "toy-codes", "--decoder", "a toy decoder.") == 0, capsys.readouterr().err
    card = ModelCard((upload / "README.md").read_text())
    expected = select_metrics(json.loads(recorded.read_text()))
    assert any(m.key.startswith("novelty_") for m in expected)  # sample-based figures among them
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == {m.key: m.value for m in expected}
    line = "Sampling settings behind sample-based numbers: temperature 1, top-k off, " + (
        "2 samples per class; guided figures at guidance scale 1.5, unguided ones without guidance."
        if conditional else "2 samples.")
    assert line in card.text


def test_eval_sampling_text_reads_every_recorded_setting():
    record = {"samples_per_class": 50, "temperature": 0.8, "top_k": 20, "top_p": 0.9, "guidance_scale": 3.0}
    assert eval_sampling_text(record) == ("temperature 0.8, top-k 20, top-p 0.9, 50 samples per class; guided "
                                          "figures at guidance scale 3, unguided ones without guidance")
    unconditional = eval_sampling_text({"samples_per_class": 8}, class_conditional=False)
    assert unconditional == "temperature 1, top-k off, 8 samples"
    with pytest.raises(ValueError, match="metrics\\['settings'\\]\\['temperature'\\] must be a number >= 0"):
        eval_sampling_text({"samples_per_class": 8, "temperature": "hot"})


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_card_shows_the_mixed_precision_accelerate_chose(learnable_dataset, tmp_path, monkeypatch):
    from codegpt.training import TrainingArguments, train

    dataset = learnable_dataset(tmp_path / "data", n=16)
    # `accelerate launch --mixed_precision bf16` (or an Accelerate config) reaches the run through this variable.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    args = TrainingArguments(output_dir=tmp_path / "run", max_steps=1, per_device_batch_size=8, warmup_steps=0,
                             samples_per_class=1, progress=False, mixed_precision=None)
    train(args, make_config(seq_len=8, num_heads=2), dataset, dataset)
    assert json.loads((tmp_path / "run" / "training_args.json").read_text())["mixed_precision"] == "bf16"
    upload = prepare_upload_folder(tmp_path / "run", tmp_path / "upload", repo_id=REPO_ID,
                                   info=CardInfo(decoder="a toy decoder.", dataset_id="toy-codes"))
    assert "| `mixed_precision` | bf16 |" in (upload / "README.md").read_text()


def test_data_dir_fills_grid_class_names_and_dataset(checkpoint, codebook_dir, tmp_path):
    from codegpt.data import write_code_dataset

    data = tmp_path / "toy-codes"
    codes = torch.randint(0, 16, (6, 2, 8), generator=torch.Generator().manual_seed(0))
    write_code_dataset(
        data,
        codes,
        torch.tensor([0, 1, 2, 0, 1, 2]),
        codebook_size=16,
        num_classes=3,
        class_names=["cat", "dog", "bird"],
        description="Toy codes, 2x8",
    )
    kwargs = dict(repo_id=REPO_ID, codebook_dir=codebook_dir, data_dir=data, metrics=METRICS)
    with pytest.raises(ValueError, match="dataset_id: evaluation results need"):  # a folder name is no id
        prepare_upload_folder(checkpoint, tmp_path / "upload", **kwargs)
    out = prepare_upload_folder(checkpoint, tmp_path / "upload", info=CardInfo(dataset_id="toy-codes"), **kwargs)
    meta = front_matter((out / "README.md").read_text())
    assert meta["grid"] == [2, 8] and meta["datasets"] == ["toy-codes"]
    assert meta["model-index"][0]["results"][0]["dataset"]["name"] == "Toy codes, 2x8"
    assert "| 2 | bird |" in (out / "README.md").read_text()

    write_code_dataset(
        tmp_path / "other", torch.zeros(2, 4, 4, dtype=torch.long), torch.tensor([0, 1]), codebook_size=8, num_classes=3
    )
    with pytest.raises(ValueError, match="data_dir: the dataset's codebook_size is 8 but the model's is 16"):
        prepare_upload_folder(
            checkpoint, tmp_path / "x", repo_id=REPO_ID, codebook_dir=codebook_dir, data_dir=tmp_path / "other"
        )


# ---------------------------------------------------------------------------------------------
# The push (to a fake Hub)
# ---------------------------------------------------------------------------------------------


def check_signature(name: str, *args, **kwargs) -> None:
    """The call must also fit the real HfApi method (whichever huggingface_hub is installed)."""
    inspect.signature(getattr(HfApi, name)).bind(None, *args, **kwargs)


class FakeApi:
    """Records calls and snapshots every uploaded file, as the Hub would store them."""

    def __init__(self, token=None):
        self.token = token
        self.calls: list[str] = []
        self.files: dict[str, bytes] = {}
        self.commits: list[dict] = []

    def create_repo(self, repo_id, **kwargs):
        check_signature("create_repo", repo_id, **kwargs)
        self.calls.append("create_repo")
        assert repo_id == REPO_ID and kwargs["exist_ok"] is True

    def upload_folder(self, *, repo_id, folder_path, delete_patterns, **kwargs):
        check_signature(
            "upload_folder", repo_id=repo_id, folder_path=folder_path, delete_patterns=delete_patterns, **kwargs
        )
        self.calls.append("upload_folder")
        folder = Path(folder_path)
        files = {name: (folder / name).read_bytes() for name in files_under(folder)}
        self.files.update(files)
        self.commits.append({"files": sorted(files), "delete": delete_patterns, **kwargs})
        return type("CommitInfo", (), {"oid": SHA})()

    def upload_file(self, *, path_or_fileobj, path_in_repo, repo_id, **kwargs):
        check_signature(
            "upload_file", path_or_fileobj=path_or_fileobj, path_in_repo=path_in_repo, repo_id=repo_id, **kwargs
        )
        self.calls.append("upload_file")
        self.files[path_in_repo] = path_or_fileobj
        self.commits.append({"files": [path_in_repo], **kwargs})
        return type("CommitInfo", (), {"oid": "f" * 40})()


def test_push_uploads_the_dry_run_folder_then_pins_the_card(checkpoint, codebook_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    kwargs = dict(info=INFO, codebook_dir=codebook_dir, metrics=METRICS)
    dry = prepare_upload_folder(checkpoint, tmp_path / "dry", repo_id=REPO_ID, **kwargs)
    api = FakeApi()
    sha = push_to_hub(checkpoint, REPO_ID, api=api, **kwargs)
    assert sha == SHA
    assert api.calls == ["create_repo", "upload_folder", "upload_file"]
    first, second = api.commits
    # The first commit is byte for byte the dry-run folder; stale weights and code get deleted.
    assert first["files"] == files_under(dry)
    assert "*.bin" in first["delete"] and "modeling_*.py" in first["delete"] and "README.md" not in first["delete"]
    for name in first["files"]:
        if name != "README.md":
            assert api.files[name] == (dry / name).read_bytes(), name
    # The second changes only the card, pinned to the first.
    assert second["files"] == ["README.md"]
    readme = api.files["README.md"].decode()
    assert f'revision="{SHA}"' in readme and readme.replace(SHA, "main") != readme
    assert all(TOKEN.encode() not in data for data in api.files.values())


def test_cli_push_takes_the_token_from_the_environment_only(checkpoint, codebook_dir, monkeypatch, capsys):
    import huggingface_hub

    made: list[FakeApi] = []

    def fake_hf_api(token=None):
        made.append(FakeApi(token))
        return made[-1]

    monkeypatch.setattr(huggingface_hub, "HfApi", fake_hf_api)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert run_cli(checkpoint, "--repo-id", REPO_ID, "--codebook", codebook_dir, "--no-pin") == 0
    [api] = made
    assert api.token is None  # huggingface_hub reads HF_TOKEN itself
    assert api.calls == ["create_repo", "upload_folder"]
    out = capsys.readouterr()
    assert f'revision="{SHA}"' in out.out and TOKEN not in out.out + out.err


def test_cli_push_reports_a_refused_upload(checkpoint, codebook_dir, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub.errors import OfflineModeIsEnabled

    class OfflineApi(FakeApi):
        def create_repo(self, repo_id, **kwargs):
            raise OfflineModeIsEnabled("Cannot reach https://huggingface.co/api/repos/create: offline mode is enabled.")

    monkeypatch.setattr(huggingface_hub, "HfApi", OfflineApi)
    assert run_cli(checkpoint, "--repo-id", REPO_ID, "--codebook", codebook_dir) == 1
    assert "codegpt push: upload failed: Cannot reach" in capsys.readouterr().err


def test_load_codebook_from_folders_and_errors(codebook_dir, tmp_path):
    direct = load_codebook(codebook_dir)
    assert torch.equal(direct.centroids, Codebook.from_pretrained(codebook_dir).centroids)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "codegpt"}))
    with pytest.raises(FileNotFoundError, match="has no codebook"):
        load_codebook(tmp_path / "model")
    with pytest.raises(TypeError, match="repo_or_path must be"):
        load_codebook(3)
    with pytest.raises(ValueError, match="not a valid Hub repo id"):
        load_codebook("no/such/thing")
    assert os.environ.get("HF_HUB_OFFLINE") in (None, "1")  # tests never dial out
