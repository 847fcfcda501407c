"""The training loop: learning, parameter groups, schedule, data order, checkpoints and exact resume."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import sigkill_and_resume
from safetensors.torch import load_file

from codegpt import GPT, GPTConfig
from codegpt.evaluation import evaluate
from codegpt.runs import newest_checkpoint, resolve_run
from codegpt.training import (
    EpochBatchSampler,
    TrainingArguments,
    check_compatible,
    lr_lambda,
    make_accelerator,
    parameter_groups,
    train,
)

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

# The training tests' models have dropout, so that exact resume covers the dropout RNG too.
DROPOUT = dict(embd_dropout=0.1, resid_dropout=0.1, class_dropout_prob=0.2)


def tiny_args(out: Path, **overrides) -> TrainingArguments:
    kw = dict(
        output_dir=out,
        max_steps=40,
        per_device_batch_size=16,
        learning_rate=3e-3,
        warmup_steps=5,
        progress=False,
        samples_per_class=2,
        eval_batch_size=7,  # several evaluation batches, one of them partial
    )
    kw.update(overrides)
    return TrainingArguments(**kw)


# ---------------------------------------------------------------------------------------------
# Learning
# ---------------------------------------------------------------------------------------------


def test_tiny_run_loss_falls_and_writes_its_outputs(tmp_path, learnable_dataset, tiny_config):
    dataset = learnable_dataset(tmp_path / "data")
    train_part, val_part = dataset.split(0.25, seed=0)
    result = train(tiny_args(tmp_path / "run", eval_every=10), tiny_config(dataset, **DROPOUT), train_part, val_part)
    history = [h["loss_nats"] for h in result.eval_history]
    assert [h["step"] for h in result.eval_history] == [10, 20, 30, 40]
    assert history[-1] < history[0] - 0.3, history
    assert history[-1] < math.log(16)  # better than uniform over the codes
    final = result.final_eval
    assert final["bits_per_code"] == pytest.approx(final["loss_nats"] / math.log(2))
    # The final model loads on its own and scores the held-out split as the loop did.
    model = GPT.from_pretrained(result.model_dir).eval()
    batch = torch.utils.data.default_collate([val_part[i] for i in range(len(val_part))])
    with torch.no_grad():
        loss = model(batch["input_ids"], labels=batch["labels"], classes=batch["classes"]).loss
    assert final["loss_nats"] == pytest.approx(float(loss), rel=1e-5)
    assert final["num_codes"] == len(val_part) * dataset.seq_len
    again = evaluate(model, val_part, batch_size=5)  # no Accelerator: where the model is
    assert again == pytest.approx({k: final[k] for k in again})
    # The log: a training record every log_every (10) steps, each followed by that step's evaluation.
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], "bits_per_code" in r) for r in records] == [(s, e) for s in (10, 20, 30, 40)
                                                                      for e in (False, True)]
    assert [r for r in records if "bits_per_code" in r] == result.eval_history
    assert result.samples_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "run" / "training_args.json").read_text())["max_steps"] == 40


def test_bf16_autocast_runs_on_the_training_device(tmp_path, learnable_dataset, tiny_config):
    dataset = learnable_dataset(tmp_path / "data", n=32)
    args = tiny_args(tmp_path / "run", max_steps=3, mixed_precision="bf16", gradient_accumulation_steps=2)
    accelerator = make_accelerator(args)
    result = train(args, tiny_config(dataset, **DROPOUT), dataset, dataset, accelerator=accelerator)
    assert math.isfinite(result.final_eval["loss_nats"])
    # Autocast computes in bf16 (on the CPU, or the accelerator where there is one); the weights stay fp32
    # and so does the saved model.
    model = GPT.from_pretrained(result.model_dir).to(accelerator.device)
    ids = torch.full((2, 3), dataset.start_token_id, device=accelerator.device)
    with accelerator.autocast():
        assert model(ids, classes=torch.tensor([0, 1], device=accelerator.device)).logits.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.float32


def test_defaults_keep_a_checkpoint_and_record_the_precision_accelerate_chose(tmp_path, learnable_dataset,
                                                                              tiny_config, monkeypatch):
    """A run that names neither leaves a checkpoint at its last step (a user's work is not lost by
    default) and, with mixed_precision=None, records the precision Accelerate was configured with."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    dataset = learnable_dataset(tmp_path / "data", n=32)
    kw = dict(output_dir=tmp_path / "run", max_steps=3, per_device_batch_size=8, progress=False, mixed_precision=None)
    record = {"data": str(tmp_path / "data"), "codebook": None, "autoencoder": None, "split": None}
    result = train(TrainingArguments(**kw), tiny_config(dataset, **DROPOUT), dataset, data_record=record)
    assert newest_checkpoint(result.output_dir).name == "step-000003"
    assert json.loads((result.output_dir / "training_args.json").read_text())["mixed_precision"] == "bf16"
    # The data record is the run's, for its final model and its checkpoints alike.
    assert resolve_run(result.output_dir).data == record
    assert resolve_run(newest_checkpoint(result.output_dir)).data == record


def test_gradient_accumulation_matches_one_big_batch(tmp_path, learnable_dataset, tiny_config, fresh_accelerate_state):
    """Two micro-batches of 8 with accumulation = one batch of 16: the same samples per update (the
    data order depends on the global batch only) and the same mean loss. No dropout, so no RNG."""
    dataset = learnable_dataset(tmp_path / "data", n=64)
    config = tiny_config(dataset, embd_dropout=0.0, resid_dropout=0.0, class_dropout_prob=0.0)
    weights = []
    for name, batch, accumulation in (("big", 16, 1), ("accumulated", 8, 2)):
        args = tiny_args(tmp_path / name, max_steps=6, per_device_batch_size=batch,
                         gradient_accumulation_steps=accumulation)
        result = train(args, config, dataset)
        weights.append(load_file(result.model_dir / "model.safetensors"))
        fresh_accelerate_state()  # the next run has another accumulation setting
    big, accumulated = weights
    for key in big:
        torch.testing.assert_close(accumulated[key], big[key], rtol=1e-4, atol=1e-5, msg=key)


# ---------------------------------------------------------------------------------------------
# Optimizer, schedule, data order
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True])
def test_parameter_groups_cover_every_parameter_once(tie):
    model = GPT(GPTConfig(vocab_size=17, seq_len=8, embed_dim=16, num_layers=2, num_heads=2,
                          class_conditional=True, num_classes=3, tie_word_embeddings=tie))
    decay, no_decay = parameter_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for p in decay["params"] + no_decay["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert {"wte.weight", "wpe.weight", "cls_emb.weight", "h.0.attn.qkv.weight", "h.1.mlp.fc.weight"} <= decayed
    assert all(p.dim() == 1 for p in no_decay["params"])  # biases and LayerNorm weights
    assert "ln_f.weight" in {names[id(p)] for p in no_decay["params"]}


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    values = [lr_lambda(s, warmup_steps=10, max_steps=110, min_lr_ratio=0.1) for s in range(111)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(values[:9], values[1:10], strict=True))
    assert values[60] == pytest.approx(0.55)  # half way through the cosine
    assert values[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[10:-1], values[11:], strict=True))


def test_data_order_is_a_function_of_seed_epoch_and_global_batch():
    one = EpochBatchSampler(50, batch_size=8, num_processes=1, process_index=0, seed=3)
    two = [EpochBatchSampler(50, batch_size=4, num_processes=2, process_index=r, seed=3) for r in range(2)]
    for epoch in (0, 1):
        one.set_epoch(epoch)
        for s in two:
            s.set_epoch(epoch)
        single = list(one)
        split = [a + b for a, b in zip(*two, strict=True)]
        assert single == split and len(single) == 50 // 8  # the incomplete last batch is dropped
    one.set_epoch(0)
    first = list(one)
    one.set_epoch(1)
    assert list(one) != first  # a new permutation each epoch
    one.set_epoch(0, start=16)  # resume after two batches
    assert list(one) == first[2:]


def test_errors_name_what_to_fix(tmp_path, learnable_dataset, tiny_config):
    dataset = learnable_dataset(tmp_path / "data", n=8)
    with pytest.raises(ValueError, match="per_device_batch_size"):
        train(tiny_args(tmp_path / "run", per_device_batch_size=16), tiny_config(dataset, **DROPOUT), dataset)
    with pytest.raises(ValueError, match=r"set vocab_size=17"):
        check_compatible(tiny_config(dataset, vocab_size=33, codebook_size=32), 16, (2, 4), 3)
    with pytest.raises(ValueError, match=r"set seq_len=8"):
        check_compatible(tiny_config(dataset, seq_len=16), 16, (2, 4), 3)
    with pytest.raises(ValueError, match="max_grad_norm"):
        TrainingArguments(output_dir=tmp_path, max_grad_norm=-1.0)
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainingArguments(output_dir=tmp_path, mixed_precision="fp8")


# ---------------------------------------------------------------------------------------------
# Checkpoints and exact resume
# ---------------------------------------------------------------------------------------------


def test_checkpoints_keep_the_last_k_and_half_written_ones_are_never_picked(tmp_path, learnable_dataset, tiny_config):
    dataset = learnable_dataset(tmp_path / "data", n=48)
    out = tmp_path / "run"
    train(tiny_args(out, max_steps=6, save_every=2, save_total_limit=2), tiny_config(dataset, **DROPOUT), dataset)
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000004", "step-000006"]
    newest = ckpts / "step-000006"
    assert (newest / "model" / "model.safetensors").is_file() and (newest / "optimizer.bin").is_file()
    assert newest_checkpoint(out) == newest

    # A kill mid-save leaves a .tmp folder, or (other writers) a folder without the marker, or a
    # marker cut short: none of them is complete.
    (ckpts / "step-000008.tmp").mkdir()
    (ckpts / "step-000008.tmp" / "trainer_state.json").write_text('{"step": 8}')
    (ckpts / "step-000010").mkdir()
    (ckpts / "step-000010" / "model.safetensors").write_bytes(b"")
    (ckpts / "step-000012").mkdir()
    (ckpts / "step-000012" / "trainer_state.json").write_text('{"step": 1')
    assert newest_checkpoint(out) == newest

    # Without --resume an existing run is not silently mixed with a new one.
    with pytest.raises(ValueError, match="resume"):
        train(tiny_args(out, max_steps=6, save_every=2), tiny_config(dataset, **DROPOUT), dataset)
    # Resuming a finished run to the step it reached is refused (not a silent no-op) and keeps its weights
    # and its records.
    before = load_file(out / "model" / "model.safetensors")
    records = {name: (out / name).read_bytes() for name in ("training_args.json", "starts.jsonl", "log.jsonl")}
    with pytest.raises(ValueError, match=r"max_steps 6 .* already at step 6"):
        train(tiny_args(out, max_steps=6, save_every=2, resume=True), tiny_config(dataset, **DROPOUT), dataset)
    after = load_file(out / "model" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert records == {name: (out / name).read_bytes() for name in records}
    assert not (ckpts / "step-000008.tmp").exists()  # leftovers of cut-short saves are cleared
    # With more steps it goes on from the newest complete checkpoint.
    result = train(tiny_args(out, max_steps=8, save_every=2, resume=True), tiny_config(dataset, **DROPOUT), dataset)
    assert result.step == 8 and result.resumed_from == newest


def test_sigkill_then_resume_matches_an_uninterrupted_run_bit_for_bit(tmp_path):
    full, killed = sigkill_and_resume(tmp_path)

    a = load_file(full / "model" / "model.safetensors")
    b = load_file(killed / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ after resume: {different}"


def test_two_process_accelerate_launch_and_single_process_load(tmp_path, learnable_dataset):
    dataset = learnable_dataset(tmp_path / "data", n=64)
    out = tmp_path / "run"
    cmd = [
        str(Path(sys.executable).with_name("accelerate")), "launch",
        "--config_file", str(REPO / "examples" / "accelerate_cpu2.yaml"), "--main_process_port", "0",
        "-m", "codegpt", "train", "--data", str(tmp_path / "data"), "--out", str(out),
        "--steps", "4", "--batch-size", "8", "--embed-dim", "32", "--layers", "1", "--heads", "2",
        "--save-every", "2", "--val-fraction", "0.25", "--samples-per-class", "1", "--no-progress",
    ]
    # Two CPU processes over gloo wherever the tests run (on a one-GPU machine the config would ask for two GPUs).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "held-out:" in proc.stdout and proc.stdout.count("model:") == 1  # one process prints

    state = json.loads((out / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["global_batch"] == 16
    for folder in (out / "model", out / "checkpoints" / "step-000004" / "model"):
        model = GPT.from_pretrained(folder)
        ids = torch.full((2, 1), dataset.start_token_id)
        assert model(ids, classes=torch.tensor([0, 1])).logits.shape == (2, 1, dataset.vocab_size)
    final = load_file(out / "model" / "model.safetensors")
    ckpt = load_file(out / "checkpoints" / "step-000004" / "model" / "model.safetensors")
    assert all(torch.equal(final[k], ckpt[k]) for k in final)
