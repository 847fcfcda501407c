"""The training speed switches (fused AdamW, gradient checkpointing, torch.compile): each computes the same
step as the plain one, and a resume may turn compile and checkpointing on or off but not the fused kernel."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from codegpt import GPT
from codegpt.training import RESUMABLE, TrainingArguments, parameter_groups, train

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

DROPOUT = dict(embd_dropout=0.1, resid_dropout=0.1, class_dropout_prob=0.2)


def args_for(out: Path, **overrides) -> TrainingArguments:
    kw = dict(output_dir=out, max_steps=6, per_device_batch_size=16, learning_rate=3e-3, warmup_steps=2,
              progress=False, samples_per_class=1, save_every=0, adam_fused=False)
    return TrainingArguments(**{**kw, **overrides})


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


def assert_close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


def test_fused_adamw_takes_the_same_steps_as_the_default_one():
    """The fused kernel (CPU since torch 2.4, CUDA) against torch's default (foreach), with codegpt's parameter
    groups (weight decay on matrices only), over a few steps of the same gradients."""
    torch.manual_seed(0)
    from conftest import make_config

    plain = GPT(make_config())
    fused = GPT(make_config())
    fused.load_state_dict(plain.state_dict())
    start = {k: v.clone() for k, v in plain.state_dict().items()}
    optimizers = [torch.optim.AdamW(parameter_groups(m, 0.1), lr=1e-2, betas=(0.9, 0.95), fused=f)
                  for m, f in ((plain, None), (fused, True))]
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=g) for p in plain.parameters()]
        for model, opt in zip((plain, fused), optimizers, strict=True):
            for p, grad in zip(model.parameters(), grads, strict=True):
                p.grad = grad.clone()
            opt.step()
    assert_close_weights(plain.state_dict(), fused.state_dict(), atol=1e-6)
    assert all(not torch.equal(start[k], v) for k, v in fused.state_dict().items())  # every tensor took the steps


def test_a_run_with_fused_adamw_ends_where_the_plain_one_does(tmp_path, learnable_dataset, tiny_config,
                                                               fresh_accelerate_state):
    dataset = learnable_dataset(tmp_path / "data", n=32)
    config = tiny_config(dataset, **DROPOUT)
    train(args_for(tmp_path / "plain"), config, dataset)
    fresh_accelerate_state()
    train(args_for(tmp_path / "fused", adam_fused=True), config, dataset)
    assert_close_weights(final_weights(tmp_path / "plain"), final_weights(tmp_path / "fused"), atol=1e-5)
    # The default (None) is the fused kernel where the device has one: here, the CPU.
    fresh_accelerate_state()
    train(args_for(tmp_path / "auto", adam_fused=None), config, dataset)
    assert_close_weights(final_weights(tmp_path / "fused"), final_weights(tmp_path / "auto"), atol=0)


def test_gradient_checkpointing_gives_the_same_run(tmp_path, learnable_dataset, tiny_config, fresh_accelerate_state):
    """Recomputed activations (dropout masks included: the recomputation replays the RNG) give the same
    gradients, so the same weights; the caller's model comes back without checkpointing."""
    dataset = learnable_dataset(tmp_path / "data", n=32)
    config = tiny_config(dataset, **DROPOUT)
    train(args_for(tmp_path / "plain"), config, dataset)
    fresh_accelerate_state()
    torch.manual_seed(0)
    model = GPT(config)
    train(args_for(tmp_path / "checkpointed", gradient_checkpointing=True), model, dataset)
    assert_close_weights(final_weights(tmp_path / "plain"), final_weights(tmp_path / "checkpointed"), atol=1e-6)
    assert not any(getattr(block, "gradient_checkpointing", False) for block in model.h)
    saved = (tmp_path / "checkpointed" / "model" / "config.json").read_text()
    assert "checkpointing" not in saved  # a training setting, not part of the model


def test_compiled_training_step_gives_the_same_run(tmp_path, learnable_dataset, tiny_config, fresh_accelerate_state):
    """torch.compile of the training step (backend aot_eager here: the same graph capture, no C++ build) gives
    the same weights as eager, within float tolerance; evaluation and samples use the plain module."""
    dataset = learnable_dataset(tmp_path / "data", n=32)
    config = tiny_config(dataset)  # no dropout: compiled kernels may draw dropout masks their own way
    train(args_for(tmp_path / "eager", eval_every=3), config, dataset, dataset)
    fresh_accelerate_state()
    result = train(args_for(tmp_path / "compiled", eval_every=3, torch_compile=True, torch_compile_backend="aot_eager"),
                   config, dataset, dataset)
    assert_close_weights(final_weights(tmp_path / "eager"), final_weights(tmp_path / "compiled"), atol=1e-5)
    assert [e["step"] for e in result.eval_history] == [3, 6]
    assert result.samples_png.is_file()


def test_a_resume_may_switch_compile_and_checkpointing_but_not_the_fused_kernel(
        tmp_path, learnable_dataset, tiny_config, fresh_accelerate_state):
    assert {"torch_compile", "torch_compile_backend", "gradient_checkpointing"} <= RESUMABLE
    assert "adam_fused" not in RESUMABLE
    dataset = learnable_dataset(tmp_path / "data", n=32)
    config = tiny_config(dataset, **DROPOUT)
    train(args_for(tmp_path / "run", max_steps=3, save_every=3), config, dataset)
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    fresh_accelerate_state()
    with pytest.raises(ValueError, match="adam_fused: False -> True"):
        train(args_for(tmp_path / "run", resume=True, adam_fused=True), None, dataset)
    fresh_accelerate_state()
    train(args_for(tmp_path / "run", resume=True, gradient_checkpointing=True), None, dataset)
    fresh_accelerate_state()
    train(args_for(tmp_path / "copy", resume=True), None, dataset)
    assert_close_weights(final_weights(tmp_path / "copy"), final_weights(tmp_path / "run"), atol=1e-6)


def test_speed_switches_are_checked():
    with pytest.raises(ValueError, match="torch_compile_backend must be a non-empty str"):
        TrainingArguments(output_dir="x", torch_compile_backend=" ")
