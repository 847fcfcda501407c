"""codegpt.fast's KV-cache decoder: both paths compute the model's forward at every step, the fast path
drives every model it knows, and anything else (hooks, adapters, unknown layers) falls back to the
model's own forward instead of being refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from codegpt.fast import FastDecoder, KVDecoder, ModelDecoder, plain_kind, unknown_part
from codegpt.sampling import KVDecoder as KVDecoderFromSampling
from codegpt.sampling import generate


class LoRA(nn.Module):
    """A LoRA-style adapter: ``base(x) + up(down(x))``, ``up`` zero at first as LoRA initialises it."""

    def __init__(self, base: nn.Linear, rank: int = 2, init_std: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.up.weight, std=init_std) if init_std else nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x))


class KernelLinear(nn.Linear):
    """A CPU-kernel stand-in: computes exactly what nn.Linear computes, by another route, and says so."""

    plain_base = nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight.t()).view(*x.shape[:-1], -1)


class LoRAOnKernel(KernelLinear):
    """Built on a known kernel but computing something else: must not inherit its ``plain_base``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 1.0


def swap(module: nn.Linear, cls: type) -> nn.Linear:
    """``module``'s weights in a new module of class ``cls``."""
    new = cls(module.in_features, module.out_features, bias=module.bias is not None)
    new.load_state_dict(module.state_dict())
    return new


def with_hook(model):
    model.h[1].attn.qkv.register_forward_hook(lambda module, args, output: None)  # a probe: output unchanged
    return model


def with_pre_hook(model):
    model.h[0].mlp.fc.register_forward_pre_hook(lambda module, args: None)
    return model


def with_patched_forward(model):
    proj = model.h[0].mlp.proj
    proj.forward = lambda x: F.linear(x, proj.weight, proj.bias)  # the same function, set on the instance
    return model


def with_zero_lora(model):
    model.h[0].attn.qkv = LoRA(model.h[0].attn.qkv)
    return model


def with_unknown_linear(model):
    class MyLinear(nn.Linear):
        pass

    model.h[0].mlp.fc = swap(model.h[0].mlp.fc, MyLinear)
    return model


# Models the fast path does not know but which compute what the plain model computes.
EQUIVALENT = {
    "forward hook": with_hook,
    "forward pre-hook": with_pre_hook,
    "patched forward": with_patched_forward,
    "zero-initialised LoRA": with_zero_lora,
    "unknown Linear subclass": with_unknown_linear,
}


def decode(decoder: KVDecoder, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """The logits after every position from ``prompt - 1`` on, ``(B, T - prompt + 1, V)``: one prefill,
    then one step per token."""
    with torch.inference_mode():
        got = [decoder.prefill(ids[:, :prompt])]
        got += [decoder.step(ids[:, t], t) for t in range(prompt, ids.shape[1])]
    return torch.stack(got, 1)


@pytest.mark.parametrize("threads, batch, bmm_attention", [(1, 2, True), (2, 1, True), (3, 2, True), (2, 2, False)])
def test_decoder_prefill_and_steps_match_model_with_its_own_cache(
    threads, batch, bmm_attention, tiny_model, prefix_ids
):
    # The decoder splits weights into one row block per CPU thread (3: some layers split, some not).
    # Decode steps attend through batched matmuls on a CPU and through SDPA on accelerators: both here.
    model = tiny_model()
    ids = prefix_ids(model, batch, model.config.seq_len)
    classes = torch.tensor([1, 2])[:batch]
    with torch.inference_mode():
        expected = model(ids, classes=classes).logits
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            decoder = KVDecoder(model, batch, classes)
        finally:
            torch.set_num_threads(previous)
        assert decoder.fast and decoder.bmm_attention  # on a CPU
        decoder.bmm_attention = bmm_attention
        got = [decoder.prefill(ids[:, :4])]
        got += [decoder.step(ids[:, t], t) for t in range(4, ids.shape[1])]
    torch.testing.assert_close(torch.stack(got, 1), expected[:, 3:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("path", [FastDecoder, ModelDecoder])
@pytest.mark.parametrize("conditional", [False, True])
def test_both_paths_match_the_full_forward_at_every_step_in_either_mode(path, conditional, tiny_model, prefix_ids):
    # Dropout everywhere and class dropout: the decoder is inference whatever the model's mode.
    model = tiny_model(conditional=conditional, embd_dropout=0.3, resid_dropout=0.3, attn_dropout=0.3,
                       class_dropout_prob=0.5)
    ids = prefix_ids(model, 3, model.config.seq_len)
    classes = torch.tensor([0, 3, 2]) if conditional else None  # 3 is the null class
    with torch.no_grad():
        expected = model(ids, classes=classes, use_cache=False).logits
    model.train()
    decoder = path(model, 3, classes)
    assert type(decoder) is path and decoder.fast == (path is FastDecoder)
    torch.testing.assert_close(decode(decoder, ids, 2), expected[:, 1:], atol=1e-5, rtol=0)
    assert all(m.training for m in model.modules())  # the mode is left alone
    if not conditional:  # the null class is what a class-conditional model gets without classes
        return
    with torch.no_grad():
        expected = model.eval()(ids, use_cache=False).logits
    torch.testing.assert_close(decode(path(model, 3), ids, 2), expected[:, 1:], atol=1e-5, rtol=0)


def test_sampling_imports_keep_working():
    assert KVDecoderFromSampling is KVDecoder


@pytest.mark.parametrize("modify", EQUIVALENT.values(), ids=EQUIVALENT.keys())
def test_unknown_models_fall_back_to_their_forward_with_the_same_results(modify, tiny_model, prefix_ids):
    plain, model = tiny_model(sharpen=4.0), modify(tiny_model(sharpen=4.0))
    assert unknown_part(plain) is None and unknown_part(model) is not None
    ids, classes = prefix_ids(model, 2, model.config.seq_len), torch.tensor([1, 2])

    decoder = KVDecoder(model, 2, classes)
    assert isinstance(decoder, ModelDecoder) and not decoder.fast
    assert decoder.fallback_reason == unknown_part(model)
    fast = KVDecoder(plain, 2, classes)
    assert isinstance(fast, FastDecoder)
    torch.testing.assert_close(decode(decoder, ids, 3), decode(fast, ids, 3), atol=1e-5, rtol=0)

    for kw in ({"temperature": 0}, {"top_k": 5, "generator": 3}, {"guidance_scale": 2.0, "generator": 4}):
        assert torch.equal(generate(model, classes=classes, **kw), generate(plain, classes=classes, **kw)), kw


def test_a_lora_branch_that_changes_the_output_is_computed_as_the_model_does(tiny_model, prefix_ids):
    model = tiny_model()
    model.h[1].attn.qkv = LoRA(model.h[1].attn.qkv, init_std=0.5)
    ids, classes = prefix_ids(model, 2, model.config.seq_len), torch.tensor([0, 2])
    with torch.no_grad():
        expected = model(ids, classes=classes, use_cache=False).logits
        without = tiny_model()(ids, classes=classes, use_cache=False).logits
    assert not torch.allclose(expected, without, atol=1e-3)  # the branch matters
    decoder = KVDecoder(model, 2, classes)
    assert not decoder.fast and "h.1.attn.qkv" in decoder.fallback_reason
    torch.testing.assert_close(decode(decoder, ids, 1), expected, atol=1e-5, rtol=0)
    # Greedy sampling equals a naive loop of full forwards.
    out = generate(model, classes=classes, temperature=0)
    with torch.no_grad():
        scores = model(out[:, :-1], classes=classes, use_cache=False).logits[..., : model.config.codebook_size]
    assert torch.equal(out[:, 1:], scores.argmax(-1))


def test_modules_declaring_plain_base_are_driven_on_the_fast_path(tiny_model, prefix_ids):
    model = tiny_model()
    for block in model.h:
        block.attn.qkv, block.mlp.fc = swap(block.attn.qkv, KernelLinear), swap(block.mlp.fc, KernelLinear)
    assert plain_kind(model.h[0].attn.qkv) is nn.Linear and unknown_part(model) is None
    ids, classes = prefix_ids(model, 2, model.config.seq_len), torch.tensor([1, 0])
    with torch.no_grad():
        expected = model(ids, classes=classes, use_cache=False).logits
    decoder = KVDecoder(model, 2, classes)
    assert isinstance(decoder, FastDecoder)
    torch.testing.assert_close(decode(decoder, ids, 4), expected[:, 3:], atol=1e-5, rtol=0)

    # The declaration is the class's own: a subclass that computes something else is unknown.
    model.h[1].mlp.fc = swap(model.h[1].mlp.fc, LoRAOnKernel)
    assert plain_kind(model.h[1].mlp.fc) is None
    assert "h.1.mlp.fc" in unknown_part(model)
    assert not KVDecoder(model, 2, classes).fast


def test_the_fast_path_refuses_what_it_does_not_know(tiny_model):
    model = with_unknown_linear(tiny_model())
    with pytest.raises(NotImplementedError, match=r"h\.0\.mlp\.fc"):
        FastDecoder(model, 1)
    model = with_hook(tiny_model())
    with pytest.raises(NotImplementedError, match="hooks"):
        FastDecoder(model, 1)


@pytest.mark.parametrize(
    "modify, reason",
    [
        (lambda m: m.h[0].mlp.__setattr__("act", nn.ReLU()), "h.0.mlp.act"),
        (lambda m: m.h[1].mlp.__setattr__("act", nn.Dropout()), "h.1.mlp.act is a Dropout"),
        (lambda m: m.ln_f.to(torch.float64), "mix dtypes"),
        (lambda m: m.h[1].to("meta"), "meta"),
        (lambda m: m.wte.__setattr__("max_norm", 1.0), "max_norm"),
        (lambda m: m.h.__setattr__("0", type("Block", (type(m.h[0]),), {})(m.config, 0)), "h.0 is a Block"),
    ],
)
def test_unknown_part_names_what_the_fast_path_does_not_know(modify, reason, tiny_model):
    model = tiny_model()
    modify(model)
    assert reason in unknown_part(model)
    assert not KVDecoder(model, 1).fast


def test_global_hooks_are_unknown(tiny_model):
    model = tiny_model()
    handle = nn.modules.module.register_module_forward_hook(lambda module, args, output: None)
    try:
        assert "global forward hooks" in unknown_part(model)
    finally:
        handle.remove()
    assert unknown_part(model) is None


def test_the_model_path_steps_only_where_its_cache_ends(tiny_model, prefix_ids):
    model = tiny_model()
    ids = prefix_ids(model, 1, 4)
    decoder = ModelDecoder(model, 1, length=6)
    with torch.inference_mode():
        with pytest.raises(ValueError, match="prefill first"):
            decoder.step(ids[:, 0], 0)
        decoder.prefill(ids[:, :3])
        with pytest.raises(ValueError, match="pos=4"):
            decoder.step(ids[:, 3], 4)
        decoder.step(ids[:, 3], 3)
        decoder.step(ids[:, 4], 4)
        with pytest.raises(ValueError, match="beyond the cache's 6 positions"):
            decoder.step(ids[:, 4], 6)
