"""EMA weights (``ema_decay``): the average torch defines, saved as the model (the trained weights in model-raw/),
evaluated and sampled by choice, and resumed bit for bit after a kill."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import sigkill_and_resume
from safetensors.torch import load_file

from codegpt import GPT, runs
from codegpt.evaluation import evaluate
from codegpt.training import TrainingArguments, train


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def tiny_args(out: Path, **overrides) -> TrainingArguments:
    kw = dict(output_dir=out, max_steps=3, per_device_batch_size=8, learning_rate=3e-3, warmup_steps=1,
              progress=False, samples_per_class=1, eval_batch_size=16, ema_decay=0.5)
    kw.update(overrides)
    return TrainingArguments(**kw)


def weights(folder: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(folder / name)


def test_ema_is_torchs_average_saved_as_the_model_beside_the_trained_weights(tmp_path, learnable_dataset,
                                                                             tiny_config):
    dataset = learnable_dataset(tmp_path / "data", n=48)
    train_part, val_part = dataset.split(0.25, seed=0)
    out = tmp_path / "run"
    result = train(tiny_args(out, save_every=1, save_total_limit=3, eval_every=1),
                   tiny_config(dataset, embd_dropout=0.1, resid_dropout=0.1), train_part, val_part)

    # Each checkpoint holds the trained weights (Accelerate's model.safetensors) and, as its model/, their
    # average: the first update copies the weights, each later one moves the average halfway (decay 0.5).
    trained = [weights(out / "checkpoints" / f"step-00000{s}") for s in (1, 2, 3)]
    averaged = [weights(out / "checkpoints" / f"step-00000{s}" / "model") for s in (1, 2, 3)]
    expected = dict(trained[0])
    for step in range(3):
        if step:
            expected = {k: torch.lerp(expected[k], trained[step][k], 0.5) for k in expected}
        for key, value in averaged[step].items():
            torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-7, msg=f"step {step + 1} {key}")
    assert value.dtype == torch.float32
    assert not all(torch.equal(averaged[2][k], trained[2][k]) for k in averaged[2])

    # The final folders: model/ = the average (what sample, eval and push take), model-raw/ = the trained weights.
    assert result.model_dir == out / "model" and result.raw_model_dir == out / "model-raw"
    assert all(torch.equal(weights(out / "model")[k], averaged[2][k]) for k in averaged[2])
    final_trained = weights(out / "model-raw")
    assert all(torch.equal(final_trained[k], trained[2][k]) for k in final_trained)
    assert runs.verify_run(out)[-2:] == [out / "model", out / "model-raw"]
    assert json.loads((out / "training_args.json").read_text())["ema_decay"] == 0.5

    # Every evaluation scores both, the average as ema_*; the readers give each folder its own weights' figures.
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evaluations = [r for r in log if runs.is_eval_record(r)]
    assert [r["step"] for r in evaluations] == [1, 2, 3]
    assert evaluations[0]["ema_loss_nats"] == pytest.approx(evaluations[0]["loss_nats"])  # a copy at step 1
    model, raw = (GPT.from_pretrained(out / name) for name in ("model", "model-raw"))
    scored = evaluate(model, val_part, batch_size=16)
    assert result.final_eval == pytest.approx({"step": 3, **scored})
    assert runs.resolve_run(out).metrics == result.final_eval
    assert runs.resolve_run(out / "model-raw").metrics == pytest.approx({"step": 3, **evaluate(raw, val_part)})
    assert runs.resolve_run(out / "checkpoints" / "step-000002").metrics["loss_nats"] == evaluations[1]["ema_loss_nats"]
    # A push ships the average, with its figures and the EMA setting on the card.
    from huggingface_hub import ModelCard

    from codegpt.hub import CardInfo, prepare_upload_folder

    info = CardInfo(decoder="a test decoder", dataset_id="toy-codes")
    upload = prepare_upload_folder(out, tmp_path / "upload", repo_id="someone/ema-prior", info=info)
    assert all(torch.equal(weights(upload)[k], averaged[2][k]) for k in weights(upload))
    card = ModelCard((upload / "README.md").read_text())
    assert {r.metric_type: r.metric_value for r in card.data.eval_results}["bits_per_code"] == pytest.approx(
        evaluations[2]["ema_bits_per_code"], rel=1e-3)
    assert "ema_decay" in card.text
    # The sample grid is drawn from the average, as `codegpt sample` would draw it from model/.
    codes, _ = runs.sample_classes(model, 1, seed=0)
    grid = runs.save_image_grid(runs.render_codes(codes, (2, 4), None, model.config.codebook_size),
                                tmp_path / "again.png", rows=3)
    assert grid.read_bytes() == result.samples_png.read_bytes()


def test_without_eval_ema_only_the_trained_weights_are_scored_and_sampled(tmp_path, learnable_dataset, tiny_config):
    dataset = learnable_dataset(tmp_path / "data", n=32)
    result = train(tiny_args(tmp_path / "run", max_steps=2, save_every=0, eval_ema=False), tiny_config(dataset),
                   dataset, dataset)
    (evaluation,) = result.eval_history
    assert not [k for k in evaluation if k.startswith("ema_")]
    # model/ holds the average, which nothing scored: no figures rather than the trained weights' figures.
    assert result.final_eval is None and runs.resolve_run(result.output_dir).metrics is None
    assert runs.resolve_run(result.raw_model_dir).metrics == evaluation
    raw = GPT.from_pretrained(result.raw_model_dir)
    codes, _ = runs.sample_classes(raw, 1, seed=0)
    grid = runs.save_image_grid(runs.render_codes(codes, (2, 4), None, raw.config.codebook_size),
                                tmp_path / "again.png", rows=3)
    assert grid.read_bytes() == result.samples_png.read_bytes()
    # Started over without EMA, the run folder keeps nothing of the averaged run.
    again = train(tiny_args(tmp_path / "run", max_steps=2, save_every=0, ema_decay=None, overwrite_output_dir=True),
                  tiny_config(dataset), dataset, dataset)
    assert again.raw_model_dir is None and not (tmp_path / "run" / "model-raw").exists()
    assert again.final_eval == again.eval_history[-1] == runs.resolve_run(again.output_dir).metrics


def test_ema_settings_are_checked_and_fixed_for_a_run(tmp_path, learnable_dataset, tiny_config):
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"ema_decay must be a number in \[0.0, 1.0\)"):
            TrainingArguments(output_dir=tmp_path, ema_decay=bad)
    with pytest.raises(TypeError, match="eval_ema must be a bool"):
        TrainingArguments(output_dir=tmp_path, eval_ema="yes")
    assert TrainingArguments(output_dir=tmp_path, ema_decay=0).ema_decay is None  # 0 is off

    dataset = learnable_dataset(tmp_path / "data", n=16)
    out = tmp_path / "run"
    train(tiny_args(out, max_steps=2, save_every=2, ema_decay=None), tiny_config(dataset), dataset)
    # The average decides the weights a user gets: a resume cannot switch it on, off, or change it.
    with pytest.raises(ValueError, match=r"ema_decay: None -> 0.9"):
        train(tiny_args(out, max_steps=4, save_every=2, resume=True, ema_decay=0.9), None, dataset)
    # A run recorded before ema_decay existed: its checkpoint has no average to go on from.
    for name in ("starts.jsonl",):
        records = [json.loads(line) for line in (out / name).read_text().splitlines()]
        for record in records:
            record["args"].pop("ema_decay")
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ValueError, match="step-000002 holds no EMA weights"):
        train(tiny_args(out, max_steps=4, save_every=2, resume=True, ema_decay=0.9), None, dataset)


def test_sigkill_then_resume_gives_the_same_ema_weights_and_log_bit_for_bit(tmp_path):
    # log_every=3, save_every=4: log windows cross the checkpoints.
    full, killed = sigkill_and_resume(tmp_path, {"log_every": 3, "eval_every": 10, "ema_decay": 0.8},
                                         evaluate=True)

    for folder in ("model", "model-raw"):  # the average and the trained weights
        a, b = weights(full / folder), weights(killed / folder)
        assert a.keys() == b.keys()
        assert not [k for k in a if not torch.equal(a[k], b[k])], f"{folder} differs after resume"
    assert not all(torch.equal(weights(full / "model")[k], weights(full / "model-raw")[k])
                   for k in weights(full / "model"))

    def untimed(run: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_second"}
                for line in (run / "log.jsonl").read_text().splitlines()]

    assert untimed(killed) == untimed(full)
    assert [r["step"] for r in untimed(full) if runs.is_eval_record(r)] == [10, 20, 30]
