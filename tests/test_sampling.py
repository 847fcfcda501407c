"""codegpt.sampling: the fast decoder agrees with the model, sampling follows the processed softmax,
guidance matches transformers, and bad arguments fail clearly before compute."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import GenerationConfig, LogitsProcessorList

from codegpt import GPT
from codegpt.sampling import generate, to_grid


def full_logits(model: GPT, ids: torch.Tensor, classes=None, guidance_scale=None) -> torch.Tensor:
    """(B, T, V) next-token scores from full forwards without a cache, guided like generate()."""
    with torch.no_grad():
        logits = model(ids, classes=classes, use_cache=False).logits.float()
        if guidance_scale is not None:
            cond = logits.log_softmax(-1)
            uncond = model(ids, use_cache=False).logits.float().log_softmax(-1)
            logits = guidance_scale * (cond - uncond) + uncond
    return logits


def naive_greedy(model: GPT, ids: torch.Tensor, n: int, classes=None, guidance_scale=None) -> torch.Tensor:
    """The reference: a full forward over the whole sequence for every new code, no cache."""
    for _ in range(n):
        scores = full_logits(model, ids, classes, guidance_scale)[:, -1]
        scores[:, model.config.codebook_size :] = -math.inf
        ids = torch.cat([ids, scores.argmax(-1, keepdim=True)], dim=1)
    return ids


class Recorder:
    """A user logits processor that keeps what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.calls.append((input_ids.clone(), scores.clone()))
        return scores


# ---------------------------------------------------------------------------------------------
# Agreement: fast path == full forward == model.generate
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt_len", [1, 5])
@pytest.mark.parametrize("conditional, guidance_scale", [(False, None), (True, None), (True, 3.0), (True, 0.5)])
def test_greedy_matches_model_generate_and_naive_loop(
    conditional, guidance_scale, prompt_len, tiny_model, prefix_ids
):
    model = tiny_model(conditional=conditional, sharpen=4.0)
    ids = prefix_ids(model, 3, prompt_len - 1)
    classes = torch.tensor([0, 2, 1]) if conditional else None
    n = model.config.seq_len + 1 - prompt_len

    ours = generate(model, ids, classes=classes, temperature=0, guidance_scale=guidance_scale)
    naive = naive_greedy(model, ids, n, classes, guidance_scale)
    extra = {}
    if guidance_scale is not None:
        extra = {"guidance_scale": guidance_scale, "negative_prompt_ids": ids}  # see transformers-5.md §4
    theirs = model.generate(ids, classes=classes, do_sample=False, max_new_tokens=n, **extra)

    assert ours.shape == (3, model.config.seq_len + 1)
    assert torch.equal(ours, naive)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("hooked", [False, True])
@pytest.mark.parametrize("guidance_scale", [None, 2.5])
def test_decoder_logits_match_full_forward_at_every_step(guidance_scale, hooked, tiny_model, prefix_ids):
    model = tiny_model(sharpen=4.0)
    if hooked:  # a probe the fast path does not know: generate() samples through the model's forward
        model.h[0].attn.proj.register_forward_hook(lambda module, args, output: None)
    ids, classes = prefix_ids(model, 4, 3), torch.tensor([0, 1, 2, 3])  # 3 is the null class
    recorder = Recorder()
    # Temperature and top-k must not touch what user processors see: they run after them.
    out = generate(
        model,
        ids,
        classes=classes,
        guidance_scale=guidance_scale,
        temperature=0.5,
        top_k=3,
        logits_processor=[recorder],
        generator=0,
    )

    expected = full_logits(model, out, classes, guidance_scale)
    cb = model.config.codebook_size
    assert len(recorder.calls) == model.config.seq_len + 1 - ids.shape[1]
    for seen_ids, scores in recorder.calls:
        t = seen_ids.shape[1]
        assert torch.equal(seen_ids, out[:, :t])
        assert scores.dtype == torch.float32 and scores.shape == (4, model.config.vocab_size)
        torch.testing.assert_close(scores[:, :cb], expected[:, t - 1, :cb], atol=1e-5, rtol=0)
        assert torch.all(scores[:, cb:] == -math.inf)


# ---------------------------------------------------------------------------------------------
# The sampling distribution
# ---------------------------------------------------------------------------------------------


def processed_probs(scores: torch.Tensor, temperature: float, top_k, top_p) -> torch.Tensor:
    """The target distribution written out independently of transformers: (V,) -> (V,)."""
    scores = scores / temperature
    if top_k:
        scores = scores.masked_fill(scores < scores.topk(top_k).values[-1], -math.inf)
    probs = scores.softmax(-1)
    if top_p is not None:
        order = probs.argsort(descending=True)
        before = probs[order].cumsum(0) - probs[order]  # mass of the more likely codes
        keep = torch.zeros_like(probs, dtype=torch.bool)
        keep[order] = before < top_p  # the smallest set reaching top_p
        probs = torch.where(keep, probs, 0.0)
        probs = probs / probs.sum()
    return probs


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    support = probs > 0
    assert counts[~support].sum() == 0, "sampled a code of probability 0"
    expected = n * probs[support]
    stat = ((counts[support] - expected) ** 2 / expected).sum()
    dof = int(support.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2), stat / 2))  # chi2 survival function


class ForceCode:
    """Forces one code at the first step only, so that the second step has a known context."""

    def __init__(self, code: int) -> None:
        self.code, self.done = code, False

    def __call__(self, input_ids, scores):
        if self.done:
            return scores
        self.done = True
        forced = torch.full_like(scores, -math.inf)
        forced[:, self.code] = 0.0
        return forced


@pytest.mark.parametrize(
    "temperature, top_k, top_p", [(1.0, None, None), (0.7, 5, None), (1.5, None, 0.8), (1.0, 6, 0.7)]
)
@pytest.mark.parametrize("where", ["prefill", "step"])
def test_empirical_frequencies_match_processed_softmax(temperature, top_k, top_p, where, tiny_model, prefix_ids):
    model = tiny_model(sharpen=25.0)
    n = 20000
    prompt = prefix_ids(model, 1, 3)
    classes = 2
    # The first sampled code comes out of the prompt's forward; with a forced first code, the second
    # one comes out of a cached decode step.
    extra = dict(max_new_tokens=1) if where == "prefill" else dict(max_new_tokens=2, logits_processor=[ForceCode(7)])
    out = generate(model, prompt.expand(n, -1), temperature=temperature, top_k=top_k, top_p=top_p, classes=classes,
                   generator=1234, **extra)
    if where == "prefill":
        context = prompt
    else:
        assert torch.all(out[:, -2] == 7)
        context = out[:1, :-1]
    scores = full_logits(model, context, torch.tensor([classes]))[0, -1]
    scores[model.config.codebook_size :] = -math.inf
    probs = processed_probs(scores, temperature, top_k, top_p)
    counts = torch.bincount(out[:, -1], minlength=model.config.vocab_size).double()
    assert chi_square_p_value(counts, probs.double()) > 1e-3


def test_draw_never_picks_zero_probability_entries():
    from codegpt.sampling import _draw

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0, 0.0],
                          [0.2, 0.0, 0.0, 0.0, 0.0, 0.8]]).repeat(4000, 1)
    draws = _draw(probs, torch.Generator().manual_seed(0)).view(4000, 3)
    assert set(draws[:, 0].tolist()) == {1, 3} and set(draws[:, 1].tolist()) == {2}
    assert set(draws[:, 2].tolist()) == {0, 5}
    assert abs((draws[:, 0] == 1).float().mean().item() - 0.5) < 0.04
    assert abs((draws[:, 2] == 0).float().mean().item() - 0.2) < 0.03


def test_special_tokens_are_never_sampled(tiny_model):
    # Two special ids, both made far more likely than any code.
    model = tiny_model(vocab_size=18, codebook_size=16)
    with torch.no_grad():  # special logits about 5 * 3 * 32 = 480, codes about 0
        model.ln_f.bias.fill_(3.0)
        model.lm_head.weight[16:] = 5.0
    cb = model.config.codebook_size
    for kw in ({}, {"temperature": 3.0}, {"top_p": 1.0}, {"temperature": 0}, {"guidance_scale": 2.0}):
        out = generate(model, num_samples=64, classes=1, generator=0, **kw)
        assert out[:, 0].eq(model.config.start_token_id).all() and out[:, 1:].lt(cb).all(), kw
    torch.manual_seed(0)
    theirs = model.generate(classes=torch.ones(64, dtype=torch.long), do_sample=True, top_k=0)
    assert theirs[:, 1:].lt(cb).all()


# ---------------------------------------------------------------------------------------------
# Knobs, guidance, reproducibility
# ---------------------------------------------------------------------------------------------


def test_guidance_changes_outputs_and_scale_one_does_not(tiny_model):
    model = tiny_model(sharpen=4.0)
    classes = torch.tensor([0, 1, 2, 0])
    plain = generate(model, classes=classes, generator=5)
    assert torch.equal(generate(model, classes=classes, generator=5, guidance_scale=1), plain)
    assert torch.equal(generate(model, classes=classes, generator=5, guidance_scale=1.0), plain)
    assert not torch.equal(generate(model, classes=classes, generator=5, guidance_scale=4.0), plain)


def test_same_generator_same_samples(tiny_model):
    model = tiny_model(sharpen=4.0)
    a = generate(model, classes=[0, 1, 2], top_k=8, generator=torch.Generator().manual_seed(3))
    b = generate(model, classes=[0, 1, 2], top_k=8, generator=torch.Generator().manual_seed(3))
    c = generate(model, classes=[0, 1, 2], top_k=8, generator=3)
    d = generate(model, classes=[0, 1, 2], top_k=8, generator=4)
    assert torch.equal(a, b) and torch.equal(a, c) and not torch.equal(a, d)
    torch.manual_seed(9)
    e = generate(model, classes=[0, 1, 2], top_k=8)
    torch.manual_seed(9)
    assert torch.equal(e, generate(model, classes=[0, 1, 2], top_k=8))  # the global RNG works too


def test_top_k_beyond_codebook_is_the_whole_codebook_and_zero_is_off(tiny_model):
    model = tiny_model(sharpen=4.0)
    plain = generate(model, num_samples=4, generator=2)
    assert torch.equal(generate(model, num_samples=4, generator=2, top_k=10**6), plain)
    assert torch.equal(generate(model, num_samples=4, generator=2, top_k=0), plain)
    assert torch.equal(generate(model, num_samples=4, generator=2, top_p=1.0), plain)


def test_sampling_ignores_dropout(tiny_model):
    model = tiny_model(embd_dropout=0.5, resid_dropout=0.5, class_dropout_prob=0.5)
    expected = generate(model, classes=[0, 1], temperature=0)
    assert torch.equal(generate(model.train(), classes=[0, 1], temperature=0), expected)
    assert model.training  # and the mode is left alone


def test_user_processors_run_and_lists_work(tiny_model):
    model = tiny_model()
    banned = list(range(0, 12))

    def ban(input_ids, scores):
        scores[:, banned] = -math.inf
        return scores

    out = generate(model, num_samples=8, classes=0, logits_processor=LogitsProcessorList([ban]), generator=0)
    assert out[:, 1:].ge(12).all() and out[:, 1:].lt(16).all()


# ---------------------------------------------------------------------------------------------
# Prompts, batch sizes and outputs
# ---------------------------------------------------------------------------------------------


def test_prefix_completion_keeps_the_prefix_and_to_grid(tiny_model, start_ids):
    model = tiny_model()
    grid = torch.randint(0, 16, (2, 3, 4), generator=torch.Generator().manual_seed(0))
    rows = 2
    prompt = torch.cat([start_ids(model, 2), grid[:, :rows].reshape(2, -1)], dim=1)  # first 2 rows
    out = generate(model, prompt, classes=torch.tensor([1, 2]), generator=0)
    assert out.shape == (2, 13) and out.dtype == torch.long
    completed = to_grid(out, (3, 4))
    assert completed.shape == (2, 3, 4)
    assert torch.equal(completed[:, :rows], grid[:, :rows])
    assert torch.equal(to_grid(out[:, 1:], (3, 4)), completed)
    with pytest.raises(ValueError, match="grid"):
        to_grid(out, (4, 4))


@pytest.mark.parametrize(
    "kwargs, batch",
    [
        ({}, 1),
        ({"num_samples": 5}, 5),
        ({"classes": [0, 1, 2]}, 3),
        ({"classes": 2, "num_samples": 4}, 4),
        ({"classes": torch.tensor([1]), "num_samples": 1}, 1),
    ],
)
def test_batch_size_from_classes_or_num_samples(kwargs, batch, tiny_model):
    model = tiny_model()
    out = generate(model, max_new_tokens=3, **kwargs)
    assert out.shape == (batch, 4) and out[:, 0].eq(model.config.start_token_id).all()


def test_max_new_tokens(tiny_model, prefix_ids):
    model = tiny_model(conditional=False)
    ids = prefix_ids(model, 2, 4)
    assert generate(model, ids, max_new_tokens=2).shape == (2, 7)
    assert torch.equal(generate(model, ids, max_new_tokens=0), ids)
    full = prefix_ids(model, 2, 12)
    assert torch.equal(generate(model, full), full)  # a whole image: nothing left to sample


def test_bf16_model_samples(tiny_model):
    model = tiny_model().to(torch.bfloat16)
    out = generate(model, classes=[0, 1], top_k=5, generator=0, guidance_scale=2.0)
    assert out.shape == (2, 13) and out[:, 1:].lt(16).all()


def test_model_generate_keeps_working(tiny_model):
    model = tiny_model(sharpen=4.0)
    classes = torch.tensor([0, 2])
    kw = dict(classes=classes, do_sample=True, temperature=0.8, top_k=5, top_p=0.9, num_return_sequences=3)
    torch.manual_seed(0)
    a = model.generate(**kw)
    torch.manual_seed(0)
    b = model.generate(**kw)
    assert a.shape == (6, 13) and torch.equal(a, b)
    assert a[:, 0].eq(model.config.start_token_id).all() and a[:, 1:].lt(16).all()


def test_generation_config_settings_apply_unless_given(tiny_model):
    model = tiny_model(sharpen=4.0)
    classes = torch.tensor([0, 2])
    greedy = generate(model, classes=classes, temperature=0)
    top1 = GenerationConfig(do_sample=True, top_k=1)  # sampling among one code: the argmax
    assert torch.equal(generate(model, classes=classes, generation_config=top1, generator=0), greedy)
    # An argument given here wins over the config: top-k off samples other codes.
    assert not torch.equal(generate(model, classes=classes, generation_config=top1, top_k=0, generator=0), greedy)
    # do_sample=False is greedy, its guidance_scale guides, and max_new_tokens stops early.
    guided = GenerationConfig(do_sample=False, guidance_scale=3.0, max_new_tokens=5)
    out = generate(model, classes=classes, generation_config=guided)
    assert torch.equal(out, model.generate(classes=classes, do_sample=False, guidance_scale=3.0, max_new_tokens=5))
    # A sampling config with its temperature: the same draws as those arguments given directly.
    warm = GenerationConfig(do_sample=True, temperature=0.7, top_k=4, top_p=0.9)
    assert torch.equal(generate(model, classes=classes, generation_config=warm, generator=3),
                       generate(model, classes=classes, temperature=0.7, top_k=4, top_p=0.9, generator=3))


def test_generation_config_num_return_sequences_and_suppress_tokens(tiny_model):
    model = tiny_model(sharpen=4.0)
    config = GenerationConfig(do_sample=True, top_k=0, num_return_sequences=3, suppress_tokens=[0, 1, 2, 16])
    out = generate(model, classes=[0, 2], generation_config=config, generator=0)
    assert out.shape == (6, 13)
    assert not out[:, 1:].lt(3).any() and out[:, 1:].lt(16).all()  # the suppressed codes and special ids
    # Rows come per prompt, side by side, each with its prompt's class: as if the classes were repeated.
    assert torch.equal(out, generate(model, classes=[0, 0, 0, 2, 2, 2], generation_config=config,
                                     num_return_sequences=1, generator=0))
    assert generate(model, classes=1, num_samples=2, num_return_sequences=2, max_new_tokens=1).shape == (4, 2)


def test_model_generation_config_samples_one_image_in_both_generate_paths(tiny_model):
    model = tiny_model()
    classes = torch.tensor([1, 1, 1, 1])
    torch.manual_seed(0)
    by_model = model.generate(classes=classes)  # the saved defaults: sampling, never a special id
    by_codegpt = generate(model, classes=classes, generation_config=model.generation_config, generator=0)
    for out in (by_model, by_codegpt):
        assert out.shape == (4, 13) and out[:, 1:].lt(16).all()
        assert len({tuple(row) for row in out.tolist()}) == 4  # distinct samples of one class


# ---------------------------------------------------------------------------------------------
# Errors, before any compute
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -0.2}, "top_p"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"max_new_tokens": 13}, "max_new_tokens"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"num_samples": 0}, "num_samples"),
        ({"classes": [0, 1], "num_samples": 3}, "num_samples"),
        ({"classes": [0, 4]}, "classes"),
        ({"classes": [-1]}, "classes"),
        ({"classes": torch.zeros(2, 2, dtype=torch.long)}, "classes"),
        ({"guidance_scale": 2.0}, "classes"),  # guidance without classes
        ({"input_ids": torch.zeros(2, 14, dtype=torch.long)}, "too long"),
        ({"input_ids": torch.zeros(2, 3, dtype=torch.long)}, "start token"),
        ({"input_ids": torch.tensor([[16, 3, 17]])}, "codes"),
        ({"input_ids": torch.tensor([16, 3])}, "input_ids"),
        ({"input_ids": torch.full((2, 1), 16), "classes": [0, 1, 2]}, "classes"),
        ({"num_return_sequences": 0}, "num_return_sequences"),
        ({"generation_config": GenerationConfig(max_new_tokens=13)}, "max_new_tokens must be .* \\[0, 12\\]"),
        ({"generation_config": GenerationConfig(do_sample=True, top_p=1.5)}, "top_p"),
        ({"generation_config": GenerationConfig(num_beams=2)}, "generation_config.num_beams=2"),
        ({"generation_config": GenerationConfig(repetition_penalty=1.2)}, "generation_config.repetition_penalty"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match, tiny_model):
    with pytest.raises(ValueError, match=match):
        generate(tiny_model(), **kwargs)


def test_bad_types_raise_type_error(tiny_model):
    model = tiny_model()
    with pytest.raises(TypeError, match="input_ids"):
        generate(model, torch.full((1, 1), 16.0))
    with pytest.raises(TypeError, match="classes"):
        generate(model, classes=torch.tensor([0.5]))
    with pytest.raises(TypeError, match="generator"):
        generate(model, generator="seed")
    with pytest.raises(TypeError, match="logits_processor"):
        generate(model, logits_processor=[3])
    with pytest.raises(TypeError, match="codegpt GPT"):
        generate(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="generation_config must be a transformers GenerationConfig"):
        generate(model, generation_config={"top_k": 5})


def test_unconditional_model_refuses_classes_and_guidance(tiny_model):
    model = tiny_model(conditional=False)
    with pytest.raises(ValueError, match="unconditional"):
        generate(model, classes=[0])
    with pytest.raises(ValueError, match="class-conditional"):
        generate(model, guidance_scale=2.0)


