"""Experiment tracking: the training records of log.jsonl, Accelerate's trackers (tensorboard read back; the
others by configuration only), the loss curves, and the readers of the log that want its evaluations."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from codegpt import runs
from codegpt.cli import main
from codegpt.training import TrainingArguments, make_accelerator, train

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

TIMING = {"tokens_per_second"}  # the only fields an uninterrupted run and a resumed one may disagree on


def tiny_args(out: Path, **overrides) -> TrainingArguments:
    # warmup_steps=8: every step is in the warmup, whose learning rate does not depend on max_steps, so that a
    # run stopped early and resumed with more steps can be compared with one given them from the start.
    kw = dict(output_dir=out, max_steps=6, per_device_batch_size=8, learning_rate=3e-3, warmup_steps=8,
              log_every=2, eval_every=3, save_every=0, progress=False, samples_per_class=1, eval_batch_size=16)
    kw.update(overrides)
    return TrainingArguments(**kw)


def codes(path: Path, n: int = 48):
    from codegpt.data import CodeDataset, write_code_dataset

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (n,), generator=g)
    grid = (4 * labels[:, None, None] + torch.randint(0, 4, (n, 2, 4), generator=g)) % 16
    write_code_dataset(path, grid, labels, codebook_size=16, num_classes=3)
    return CodeDataset(path)


def config():
    from conftest import make_config

    return make_config(vocab_size=17, seq_len=8, num_heads=2, num_classes=3, embd_dropout=0.1, resid_dropout=0.1,
                       class_dropout_prob=0.2)


def log_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def untimed(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def same_points(found: list[tuple[int, float]], expected: list[tuple[int, float]]) -> bool:
    """Tensorboard's (step, value) points equal ``expected``'s, values as float32 keeps them."""
    return ([s for s, _ in found] == [s for s, _ in expected]
            and [v for _, v in found] == pytest.approx([v for _, v in expected], rel=1e-6))


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


# ---------------------------------------------------------------------------------------------
# log.jsonl and tensorboard
# ---------------------------------------------------------------------------------------------


def test_log_holds_training_records_and_tensorboard_the_same_numbers(tmp_path):
    pytest.importorskip("tensorboard")
    dataset = codes(tmp_path / "data")
    result = train(tiny_args(tmp_path / "run", report_to="tensorboard"), config(), dataset, dataset)
    log = log_of(result.output_dir)
    # In the order the run writes them: a step's training record, then its evaluation; the end's evaluation last.
    assert [(r["step"], runs.is_eval_record(r)) for r in log] == [(2, False), (3, True), (4, False), (6, False),
                                                                    (6, True)]
    training = [r for r in log if not runs.is_eval_record(r)]
    assert all(set(r) == {"step", "loss", "learning_rate", "grad_norm", "tokens_per_second"} for r in training)
    assert all(r["grad_norm"] > 0 and r["tokens_per_second"] > 0 for r in training)
    # The learning rate of the next step: in the warmup, (step + 1) / warmup_steps of the peak.
    assert [r["learning_rate"] for r in training] == pytest.approx([3e-3 * (s + 1) / 8 for s in (2, 4, 6)])
    assert result.eval_history == [r for r in log if runs.is_eval_record(r)]
    assert runs.read_metrics(result.output_dir) == log[-1] == result.final_eval

    # Tensorboard holds the same numbers at the same steps (as float32), under train/ and eval/.
    found = scalars(result.output_dir / "logs" / "codegpt")
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_second"):
        assert same_points(found[f"train/{key}"], [(r["step"], r[key]) for r in training]), key
    evaluations = [r for r in log if runs.is_eval_record(r)]
    for key in ("loss_nats", "bits_per_code"):
        assert same_points(found[f"eval/{key}"], [(r["step"], r[key]) for r in evaluations]), key
    # The sample grid as an image, at the step it was drawn.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(result.output_dir / "logs" / "codegpt"), size_guidance={"images": 0})
    events.Reload()
    from PIL import Image

    (image,) = events.Images("samples")
    width, height = Image.open(result.samples_png).size
    assert (image.step, image.width, image.height) == (6, width, height)
    # The loss curves, drawn again at the end.
    assert result.loss_png == result.output_dir / "loss.png"
    assert result.loss_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_loss_is_the_mean_over_the_logged_steps(tmp_path):
    dataset = codes(tmp_path / "data")
    logs = {}
    for every in (1, 3):
        result = train(tiny_args(tmp_path / f"every{every}", log_every=every, eval_every=0), config(), dataset)
        logs[every] = [r for r in log_of(result.output_dir) if not runs.is_eval_record(r)]
    each = {r["step"]: r for r in logs[1]}
    assert [r["step"] for r in logs[3]] == [3, 6]
    for record in logs[3]:
        window = [each[s] for s in range(record["step"] - 2, record["step"] + 1)]
        assert record["loss"] == pytest.approx(sum(r["loss"] for r in window) / 3, rel=1e-6)
        assert record["grad_norm"] == pytest.approx(sum(r["grad_norm"] for r in window) / 3, rel=1e-6)
        assert record["learning_rate"] == each[record["step"]]["learning_rate"]


def test_gradient_norm_is_measured_before_clipping(tmp_path):
    dataset = codes(tmp_path / "data")
    clipped = train(tiny_args(tmp_path / "clipped", log_every=1, eval_every=0, max_steps=2, max_grad_norm=1e-3),
                    config(), dataset)
    assert all(r["grad_norm"] > 1e-2 for r in log_of(clipped.output_dir))  # the norm it had, not the bound


def test_a_resumed_log_equals_an_uninterrupted_ones(tmp_path):
    """Records after the checkpoint a run resumes from are dropped (training records and evaluations alike), and
    a log window cut by the checkpoint goes on where it stopped: the logs agree but for their timing."""
    pytest.importorskip("tensorboard")
    dataset = codes(tmp_path / "data")
    full = train(tiny_args(tmp_path / "full", max_steps=8, eval_every=4, report_to="tensorboard"), config(),
                 dataset, dataset)
    # Stopped at step 5 (checkpoints at 3 and 5), its last checkpoint then lost: it resumes from step 3, in the
    # middle of a log window, with a training record (step 5) and an evaluation (the end's) past it.
    out = tmp_path / "stopped"
    train(tiny_args(out, max_steps=5, eval_every=4, save_every=3, report_to="tensorboard"), config(), dataset,
          dataset)
    assert [r["step"] for r in log_of(out)][-2:] == [5, 5]
    shutil.rmtree(out / "checkpoints" / "step-000005")
    shutil.rmtree(out / "model")
    resumed = train(tiny_args(out, max_steps=8, eval_every=4, save_every=3, resume=True, report_to="tensorboard"),
                    config(), dataset, dataset)
    assert resumed.resumed_from.name == "step-000003"
    assert untimed(log_of(out)) == untimed(log_of(full.output_dir))
    assert resumed.eval_history == full.eval_history
    # Tensorboard hides what the stopped run logged past the checkpoint.
    a, b = scalars(full.output_dir / "logs" / "codegpt"), scalars(out / "logs" / "codegpt")
    for tag in ("train/loss", "train/grad_norm", "eval/bits_per_code"):
        assert same_points(b[tag], a[tag]), tag


# ---------------------------------------------------------------------------------------------
# The other trackers, by configuration only
# ---------------------------------------------------------------------------------------------


class RecordingAccelerator:
    """Stands in for Accelerate's Accelerator: keeps what it was made with, starts nothing."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs


@pytest.mark.parametrize("report_to, log_with", [
    ("wandb", ["wandb"]), ("trackio", ["trackio"]), (["mlflow", "wandb"], ["mlflow", "wandb"]),
    ("tensorboard,mlflow", ["tensorboard", "mlflow"]), ("all", ["all"]), ("none", None), ([], None),
])
def test_report_to_reaches_the_accelerator(tmp_path, monkeypatch, report_to, log_with):
    monkeypatch.setattr("codegpt.training.Accelerator", RecordingAccelerator)
    args = TrainingArguments(output_dir=tmp_path / "run", report_to=report_to)
    made = make_accelerator(args).kwargs
    assert made.get("log_with") == log_with
    assert made.get("project_dir") == (str(tmp_path / "run" / "logs") if log_with else None)
    assert args.to_dict()["report_to"] == (log_with or [])
    elsewhere = TrainingArguments(output_dir=tmp_path / "run", report_to=report_to, logging_dir=tmp_path / "tb")
    assert make_accelerator(elsewhere).kwargs.get("project_dir") == (str(tmp_path / "tb") if log_with else None)
    assert not {"wandb", "trackio", "mlflow"} & set(sys.modules)  # nothing imported, nothing contacted


def test_bad_trackers_are_refused_by_name(tmp_path, learnable_dataset, tiny_config):
    with pytest.raises(ValueError, match="report_to must be one of .*tensorboard.*got 'tensorbord'"):
        TrainingArguments(output_dir=tmp_path, report_to="tensorbord")
    with pytest.raises(ValueError, match="report_to: 'none' and 'all' stand alone"):
        TrainingArguments(output_dir=tmp_path, report_to=["none", "wandb"])
    with pytest.raises(TypeError, match="report_to must be a tracker name"):
        TrainingArguments(output_dir=tmp_path, report_to=3)
    # An accelerator made without the trackers the arguments ask for.
    from accelerate import Accelerator

    dataset = learnable_dataset(tmp_path / "data", n=16)
    with pytest.raises(ValueError, match=r"report_to \['tensorboard'\]: the accelerator was made without trackers"):
        train(tiny_args(tmp_path / "run", report_to="tensorboard"), tiny_config(dataset), dataset,
              accelerator=Accelerator(cpu=True))


def test_cli_help_shows_the_tracking_and_ema_flags(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--report_to REPORT_TO [REPORT_TO ...], --report-to REPORT_TO" in text
    assert "is always written (default: none)" in text
    assert "--ema_decay EMA_DECAY, --ema-decay EMA_DECAY" in text and "--logging-dir" in text


# ---------------------------------------------------------------------------------------------
# The loss curves, and readers of the log
# ---------------------------------------------------------------------------------------------


def test_without_matplotlib_the_picture_is_skipped_with_one_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # an import of it raises ImportError
    dataset = codes(tmp_path / "data")
    result = train(tiny_args(tmp_path / "run", eval_every=2), config(), dataset, dataset)
    assert result.loss_png is None and not (result.output_dir / "loss.png").exists()
    assert capsys.readouterr().out.count("no loss.png (matplotlib is not installed") == 1
    assert len(result.eval_history) == 3  # every evaluation ran


def test_loss_curves_are_drawn_from_the_log(tmp_path):
    pytest.importorskip("matplotlib")
    runs.write_log(tmp_path, [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5},
                              {"step": 2, "loss_nats": 2.7, "bits_per_code": 3.9, "ema_loss_nats": 2.8}])
    from PIL import Image

    picture = runs.plot_losses(tmp_path)
    assert picture == tmp_path / "loss.png" and Image.open(picture).size == (600, 400)
    runs.write_log(tmp_path / "empty", [])
    assert runs.plot_losses(tmp_path / "empty") is None


def test_readers_take_the_evaluations_not_the_training_records(tmp_path, capsys):
    evaluation = {"step": 4, "loss_nats": 2.0, "bits_per_code": 2.885, "num_codes": 96}
    runs.write_log(tmp_path, [{"step": 2, "loss": 2.6}, evaluation, {"step": 6, "loss": 2.1}])
    assert runs.read_metrics(tmp_path) == evaluation == runs.read_metrics(tmp_path / "log.jsonl")
    # A kill cuts the last line short: the reader skips it; a damaged line before it is an error naming it.
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 8, "lo')
    assert [r["step"] for r in runs.read_log(tmp_path)] == [2, 4, 6]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "log.jsonl").write_text('{"step": 1, "loss": 3}\nnot json\n{"step": 2, "loss": 2}\n')
    with pytest.raises(ValueError, match="log.jsonl' line 2 is not a log record"):
        runs.read_log(tmp_path / "bad")
    runs.write_log(tmp_path / "train-only", [{"step": 2, "loss": 2.6}])
    assert runs.read_metrics(tmp_path / "train-only") is None
    # `codegpt push --metrics log.jsonl` takes the last evaluation, and says so when there is none.
    from codegpt.cli import _metrics_file

    assert _metrics_file(str(tmp_path / "log.jsonl")) == evaluation
    with pytest.raises(ValueError, match="holds no evaluation record"):
        _metrics_file(str(tmp_path / "train-only" / "log.jsonl"))
