"""The CPU training kernels: each computes what its plain torch module computes, and swapping them
into a model in place changes neither its outputs nor its checkpoints."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model
from torch import nn

from codegpt import GPT
from codegpt.fast import remove_cpu_kernels, use_cpu_kernels
from codegpt.fast.kernels import GELU, Dropout, Linear


@pytest.mark.parametrize("mode", ["autocast-bf16", "bf16", "fp16"])
@pytest.mark.parametrize("frozen", [None, "weight", "input"])
def test_reduced_precision_cpu_linear_matches_autograd(mode, frozen):
    """The layout-aware reduced-precision CPU backward gives autograd's own gradients."""
    from codegpt.fast.kernels import Linear

    torch.manual_seed(0)
    dtype = {"autocast-bf16": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]
    ours = Linear(48, 80).to(dtype)
    plain = torch.nn.Linear(48, 80).to(dtype)
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(3, 7, 48, dtype=dtype)
    g = torch.randn(3, 7, 80, dtype=torch.bfloat16 if mode == "autocast-bf16" else dtype)

    def run(layer: torch.nn.Linear) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        layer.zero_grad(set_to_none=True)
        layer.weight.requires_grad_(frozen != "weight")
        inp = x.clone().requires_grad_(frozen != "input")
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast-bf16" else contextlib.nullcontext()
        with ctx:
            out = layer(inp)
        out.backward(g)
        grads = {"x": inp.grad, "weight": layer.weight.grad, "bias": layer.bias.grad}
        return out, grads

    out, grads = run(ours)
    ref_out, ref_grads = run(plain)
    assert out.grad_fn.name() == "_LinearReducedPrecisionCPUBackward"  # the fast path really ran
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    for name, ref in ref_grads.items():
        if ref is None:
            assert grads[name] is None, name
            continue
        assert grads[name].dtype == ref.dtype, name
        # Same products, possibly summed in another order: a few units of the format's last place.
        torch.testing.assert_close(grads[name], ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item(), msg=name)

    with torch.no_grad():  # inference is plain F.linear
        torch.testing.assert_close(ours(x), plain(x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_tanh_gelu_matches_torch(dtype):
    """The sigmoid-form tanh GELU: torch's values and gradients, in training and in inference."""
    from codegpt.fast.kernels import GELU

    x = torch.cat([torch.linspace(-30, 30, 20001, dtype=dtype), torch.randn(3, 1000, dtype=dtype).flatten()])
    g = torch.randn_like(x)
    ours_in, ref_in = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = GELU(approximate="tanh")(ours_in)
    ref = F.gelu(ref_in, approximate="tanh")
    assert y.grad_fn.name() == "_TanhGELUCPUBackward"  # the CPU path really ran
    y.backward(g)
    ref.backward(g)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}  # a few ulp
    torch.testing.assert_close(y, ref, **tol)
    torch.testing.assert_close(ours_in.grad, ref_in.grad, **tol)
    with torch.no_grad():
        torch.testing.assert_close(GELU(approximate="tanh")(x), ref.detach(), **tol)
    probe = torch.randn(40, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(GELU(approximate="tanh"), (probe,))
    # Exact GELU and low precision keep torch's kernels.
    torch.testing.assert_close(GELU()(x), F.gelu(x), rtol=0, atol=0)
    xb = x.bfloat16()
    torch.testing.assert_close(GELU(approximate="tanh")(xb), F.gelu(xb, approximate="tanh"), rtol=0, atol=0)


def test_dropout_keeps_each_element_with_probability_one_minus_p():
    from codegpt.fast.kernels import Dropout

    p, n = 0.1, 1_000_001  # odd: the last 64-bit draw is half used
    drop = Dropout(p).train()
    x = torch.rand(n, dtype=torch.float64) + 1.0  # never zero, so a zero output means dropped
    torch.manual_seed(0)
    y = drop(x.requires_grad_())
    kept = y != 0
    # Binomial(n, 1 - p): within 5 standard deviations.
    assert abs(kept.double().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.double() / (1 - p))
    torch.manual_seed(0)
    assert torch.equal(drop(x.detach()), y.detach())  # the same seed drops the same elements
    assert torch.equal(drop.eval()(x), x)


def test_swap_changes_classes_only():
    model = make_model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n: p for n, p in model.named_parameters()}
    assert use_cpu_kernels(model) is model
    kinds = {type(m) for m in model.modules()}
    assert {Linear, Dropout, GELU} <= kinds and not kinds & {nn.Linear, nn.Dropout, nn.GELU}
    assert all(type(m).plain_base in (nn.Linear, nn.Dropout, nn.GELU) for m in model.modules() if type(m) in
               (Linear, Dropout, GELU))
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(p is params[n] for n, p in model.named_parameters())  # the same Parameters, nothing copied
    remove_cpu_kernels(model)
    assert not {type(m) for m in model.modules()} & {Linear, Dropout, GELU}


def test_swap_leaves_subclasses_and_exact_gelu_alone():
    class LoRALinear(nn.Linear):
        pass

    model = nn.Sequential(LoRALinear(4, 4), nn.GELU(), nn.GELU(approximate="tanh"))
    use_cpu_kernels(model)
    assert [type(m) for m in model] == [LoRALinear, nn.GELU, GELU]


@pytest.mark.parametrize("train", [False, True])
def test_swapped_model_gives_the_same_outputs_and_gradients(train):
    ids = torch.randint(0, 16, (3, 17), generator=torch.Generator().manual_seed(1))
    classes = torch.tensor([0, 2, 1])

    def run(swap: bool):
        model = make_model().train(train)
        if swap:
            use_cpu_kernels(model)
        torch.manual_seed(7)
        out = model(ids, labels=ids, classes=classes)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad for n, p in model.named_parameters()}

    (plain, plain_grads), (fast, fast_grads) = run(False), run(True)
    if train:  # dropout masks come from another generator: the same model, other random draws
        assert plain.shape == fast.shape and torch.isfinite(fast).all()
        return
    # fp32: the same matmuls; only the GELU is another formula of the same function (rounding).
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_saved_swapped_model_loads_as_plain_gpt(tmp_path):
    model = use_cpu_kernels(make_model())
    ids = torch.randint(0, 16, (2, 17), generator=torch.Generator().manual_seed(2))
    expected = model(ids, classes=torch.tensor([0, 1])).logits
    model.save_pretrained(tmp_path)
    loaded = GPT.from_pretrained(tmp_path)
    assert not {type(m) for m in loaded.modules()} & {Linear, Dropout, GELU}
    torch.testing.assert_close(loaded(ids, classes=torch.tensor([0, 1])).logits, expected, rtol=1e-5, atol=1e-5)
    source = (tmp_path / "modeling_codegpt.py").read_text()
    assert "import codegpt" not in source and "autograd.Function" not in source  # no kernel uploaded
