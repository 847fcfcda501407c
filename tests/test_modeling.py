"""The model behaves like a transformers model: equivalences users rely on, and clear errors."""

from __future__ import annotations

import contextlib
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import make_config, make_model
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from codegpt import GPT, GPTConfig


def random_batch(config: GPTConfig, batch: int = 3, length: int | None = None, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    length = config.max_position_embeddings if length is None else length
    ids = torch.randint(0, config.codebook_size, (batch, length), generator=g)
    ids[:, 0] = config.start_token_id
    classes = torch.randint(0, max(config.num_classes, 1), (batch,), generator=g)
    return ids, (classes if config.class_conditional else None)


# ---------------------------------------------------------------------------------------------
# Usage and config
# ---------------------------------------------------------------------------------------------


def test_seed_usage_verbatim():
    torch.manual_seed(0)
    input_ids = torch.randint(0, 999, (2, 1024))
    labels = input_ids.clone()
    classes = torch.tensor([3, 7])

    from codegpt import GPT, GPTConfig

    config = GPTConfig(vocab_size=1000, seq_len=1024, embed_dim=256, num_layers=8,
                       class_conditional=True, num_classes=10)
    model = GPT(config)
    logits, loss = model(input_ids, labels=labels, classes=classes)

    assert model.training  # like every torch module
    assert logits.shape == (2, 1024, 1000)
    assert loss.ndim == 0 and torch.isfinite(loss)
    out = model(input_ids, labels=labels, classes=classes)
    assert out.logits.shape == logits.shape and out["loss"].ndim == 0 and out[0] is out.loss
    logits_only, no_loss = model.eval()(input_ids, classes=classes)
    assert no_loss is None and logits_only.shape == logits.shape


def test_config_standard_names_and_positions():
    cfg = make_config()
    assert cfg.hidden_size == 32 and cfg.num_hidden_layers == 2 and cfg.num_attention_heads == 4
    assert cfg.max_position_embeddings == cfg.seq_len + 1
    assert cfg.intermediate_size == 4 * 32
    assert cfg.codebook_size == 16 and cfg.start_token_id == 16 and cfg.bos_token_id == 16
    model = GPT(cfg)
    assert model.wpe.num_embeddings == cfg.seq_len + 1
    assert model.cls_emb.num_embeddings == cfg.num_classes + 1  # + the null class


def test_config_json_round_trip(tmp_path):
    cfg = make_config(mlp_dim=48, attn_dropout=0.05, class_dropout_prob=0.2, tie_word_embeddings=True,
                      vocab_size=20, codebook_size=16, start_token_id=18)
    cfg.save_pretrained(tmp_path)
    loaded = GPTConfig.from_pretrained(tmp_path)
    auto = AutoConfig.from_pretrained(tmp_path)
    for c in (loaded, auto):
        assert isinstance(c, GPTConfig)
        for key in ("vocab_size", "seq_len", "embed_dim", "num_layers", "num_heads", "mlp_dim",
                    "attn_dropout", "class_dropout_prob", "tie_word_embeddings", "codebook_size",
                    "start_token_id", "num_classes", "class_conditional"):
            assert getattr(c, key) == getattr(cfg, key), key
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "codegpt"
    assert "max_position_embeddings" not in saved  # derived, never stored


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(embed_dim=30, num_heads=4), "embed_dim"),
        (dict(num_classes=0), "num_classes"),
        (dict(embd_dropout=1.0), "embd_dropout"),
        (dict(attn_dropout=-0.1), "attn_dropout"),
        (dict(resid_dropout=1.5), "resid_dropout"),
        (dict(class_dropout_prob=1.0), "class_dropout_prob"),
        (dict(start_token_id=17), "start_token_id"),
        (dict(start_token_id=3), "start_token_id"),  # a code id cannot be the start token
        (dict(codebook_size=17), "codebook_size"),
        (dict(vocab_size=1), "vocab_size"),
        (dict(seq_len=0), "seq_len"),
        (dict(num_layers=0), "num_layers"),
        (dict(num_heads=2.0), "num_heads"),
        (dict(initializer_range=0.0), "initializer_range"),
        (dict(layer_norm_eps=-1e-5), "layer_norm_eps"),
        (dict(mlp_dim=0), "mlp_dim"),
    ],
)
def test_config_rejects_invalid_values(overrides, field):
    with pytest.raises(ValueError, match=field):
        make_config(**overrides)


def test_invalid_config_json_is_rejected_on_load(tmp_path):
    make_config().save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["num_heads"] = 5
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="num_heads"):
        GPTConfig.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------
# Numerical equivalences
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("conditional", [True, False])
def test_eager_matches_sdpa(conditional):
    model = make_model(class_conditional=conditional, num_classes=3 if conditional else 0)
    ids, classes = random_batch(model.config)
    model.config._attn_implementation = "sdpa"
    sdpa_logits = model(ids, classes=classes).logits
    model.config._attn_implementation = "eager"
    eager_out = model(ids, classes=classes, output_attentions=True)
    torch.testing.assert_close(eager_out.logits, sdpa_logits, rtol=0, atol=1e-5)
    # and after a past of 5 tokens, with 4 new ones (explicit-mask path)
    for impl in ("eager", "sdpa"):
        model.config._attn_implementation = impl
        past = model(ids[:, :5], classes=classes, use_cache=True).cache
        chunk = model(ids[:, 5:9], classes=classes, cache=past).logits
        torch.testing.assert_close(chunk, sdpa_logits[:, 5:9], rtol=0, atol=1e-5)


def test_attn_implementation_selectable_at_load(tmp_path):
    make_model().save_pretrained(tmp_path)
    for impl in ("eager", "sdpa"):
        m = GPT.from_pretrained(tmp_path, attn_implementation=impl)
        assert m.config._attn_implementation == impl
    m.set_attn_implementation("eager")  # switching after load works too
    assert m.config._attn_implementation == "eager"


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")  # 5.24+: the old name
def test_cached_incremental_matches_full_forward():
    model = make_model()
    ids, classes = random_batch(model.config)
    full = model(ids, classes=classes).logits
    # one token at a time
    cache, steps = None, []
    for t in range(ids.shape[1]):
        out = model(ids[:, t : t + 1], classes=classes, cache=cache, use_cache=True)
        cache = out.cache
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)
    # in uneven chunks, through the legacy keyword
    cache, chunks = None, []
    for a, b in ((0, 3), (3, 4), (4, 11), (11, 17)):
        out = model(ids[:, a:b], classes=classes, past_key_values=cache, use_cache=True)
        cache = out.cache
        chunks.append(out.logits)
    torch.testing.assert_close(torch.cat(chunks, 1), full, rtol=0, atol=1e-5)


def test_padding_mask_matches_unpadded_row():
    model = make_model()
    ids, classes = random_batch(model.config, batch=2, length=8)
    pad = 3
    padded = torch.cat([torch.zeros(2, pad, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(2, pad, dtype=torch.long), torch.ones(2, 8, dtype=torch.long)], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    for impl in ("eager", "sdpa"):
        model.config._attn_implementation = impl
        out = model(padded, classes=classes, attention_mask=mask, position_ids=positions).logits
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out[:, pad:], model(ids, classes=classes).logits, rtol=0, atol=1e-5)


def test_hidden_states_and_attentions():
    model = make_model()
    ids, classes = random_batch(model.config, length=6)
    out = model(ids, classes=classes, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == model.config.num_layers + 1
    assert all(h.shape == (3, 6, 32) for h in out.hidden_states)
    assert len(out.attentions) == model.config.num_layers
    att = out.attentions[0]
    assert att.shape == (3, 4, 6, 6)
    torch.testing.assert_close(att.sum(-1), torch.ones(3, 4, 6))
    assert torch.all(att.triu(1) == 0)  # causal


def test_class_changes_output_and_none_is_null_class():
    model = make_model()
    ids, _ = random_batch(model.config, batch=2)
    a = model(ids, classes=torch.tensor([0, 0])).logits
    b = model(ids, classes=torch.tensor([1, 1])).logits
    assert not torch.allclose(a, b)
    null = torch.full((2,), model.null_class)
    torch.testing.assert_close(model(ids).logits, model(ids, classes=null).logits, rtol=0, atol=0)


def test_loss_is_mean_cross_entropy_over_counted_targets():
    model = make_model()
    ids, classes = random_batch(model.config)
    labels = ids.clone()
    labels[0, 5:9] = -100
    labels[2, -1] = -100
    logits, loss = model(ids, labels=labels, classes=classes)
    # labels are aligned with input_ids: position t predicts labels[t + 1]; the start token never is a target
    per_token, counted = [], 0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            target = labels[b, t + 1]
            if target != -100:
                per_token.append(-F.log_softmax(logits[b, t], -1)[target])
                counted += 1
    expected = torch.stack(per_token).mean()
    assert counted == 3 * 16 - 4 - 1
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


def test_gradient_checkpointing_gives_same_gradients():
    ids, classes = random_batch(make_config())

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = make_model().train()  # dropout on: checkpointing must replay the same RNG
        if checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
        torch.manual_seed(123)
        model(ids, labels=ids, classes=classes).loss.backward()
        return {n: p.grad for n, p in model.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True])
def test_save_load_round_trip_through_auto_classes(tmp_path, tie):
    model = make_model(tie_word_embeddings=tie)
    ids, classes = random_batch(model.config)
    expected = model(ids, classes=classes).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"] == {
        "AutoConfig": "configuration_codegpt.GPTConfig",
        "AutoModel": "modeling_codegpt.GPT",
        "AutoModelForCausalLM": "modeling_codegpt.GPT",
    }
    for name in ("configuration_codegpt.py", "modeling_codegpt.py", "model.safetensors"):
        assert (tmp_path / name).is_file()
    for cls in (GPT, AutoModel, AutoModelForCausalLM):
        loaded = cls.from_pretrained(tmp_path)
        assert isinstance(loaded, GPT) and not loaded.training
        assert torch.equal(loaded(ids, classes=classes).logits, expected)
        assert (loaded.lm_head.weight is loaded.wte.weight) == tie
        assert loaded.generation_config.suppress_tokens == [16]


def test_init_is_gpt2_style():
    model = GPT(GPTConfig(vocab_size=257, seq_len=64, embed_dim=128, num_layers=4, num_heads=4))
    std = model.config.initializer_range
    assert abs(model.wte.weight.std().item() - std) < 0.002
    assert abs(model.h[0].attn.qkv.weight.std().item() - std) < 0.002
    scaled = std / (2 * 4) ** 0.5
    assert abs(model.h[0].mlp.proj.weight.std().item() - scaled) < 0.001
    assert abs(model.h[0].attn.proj.weight.std().item() - scaled) < 0.001
    assert torch.all(model.h[0].attn.qkv.bias == 0)


# ---------------------------------------------------------------------------------------------
# transformers integration: generate and Trainer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("conditional", [True, False])
def test_model_generate_greedy_cache_equals_no_cache(conditional):
    model = make_model(class_conditional=conditional, num_classes=3 if conditional else 0)
    kwargs = dict(classes=torch.tensor([0, 2])) if conditional else dict(
        input_ids=torch.full((2, 1), model.config.start_token_id)
    )
    with_cache = model.generate(**kwargs, do_sample=False)
    without = model.generate(**kwargs, do_sample=False, use_cache=False)
    assert with_cache.shape == (2, model.config.seq_len + 1)  # exactly one image
    assert torch.equal(with_cache, without)
    assert (with_cache[:, 0] == model.config.start_token_id).all()
    assert (with_cache[:, 1:] < model.config.codebook_size).all()


def test_model_generate_never_samples_special_tokens():
    model = make_model(vocab_size=19, codebook_size=16)  # ids 16 (start), 17, 18 are special
    with torch.no_grad():
        # Make every special id overwhelmingly likely: without suppression, sampling would pick one.
        model.ln_f.weight.zero_()
        model.ln_f.bias.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[16:] = 5.0
    torch.manual_seed(0)
    out = model.generate(classes=torch.tensor([0, 1, 2, 0]), do_sample=True, top_k=0)
    assert (out[:, 1:] < 16).all()


def test_saved_model_samples_one_image_by_default_and_greedy_on_request(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert (saved["do_sample"], saved["top_k"], saved["max_length"], saved["suppress_tokens"]) == (True, 16, 17, [16])
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    classes = torch.tensor([1, 1, 1, 1])
    torch.manual_seed(0)
    sampled = loaded.generate(classes=classes)
    assert sampled.shape == (4, 17) and sampled[:, 1:].lt(16).all()
    assert len({tuple(row) for row in sampled.tolist()}) == 4  # distinct samples of one class
    torch.manual_seed(0)
    assert torch.equal(model.generate(classes=classes), sampled)  # the same defaults before saving
    greedy = loaded.generate(classes=classes, do_sample=False)
    assert torch.equal(greedy, greedy_by_hand(loaded, greedy[:, :1], classes, 16))
    # The recommended top-k: 100 codes, or the whole codebook when it is smaller.
    assert GPT(make_config(vocab_size=301)).generation_config.top_k == 100


@pytest.mark.parametrize("kwargs, new_tokens", [
    (dict(max_new_tokens=17), 17),
    (dict(max_length=18), 17),
    (dict(input_ids=torch.tensor([[16, 3, 4, 5]]), max_new_tokens=14), 14),
])
def test_model_generate_refuses_more_than_one_image_before_any_step(kwargs, new_tokens):
    model = make_model()
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    T = kwargs["input_ids"].shape[1] if "input_ids" in kwargs else 1
    match = f"max_new_tokens must be at most {17 - T} and max_length at most 17 .* got max_length {T + new_tokens}"
    with pytest.raises(ValueError, match=match):
        model.generate(classes=torch.tensor([0]), do_sample=False, **kwargs)
    assert calls == []  # refused before the first forward
    # Exactly one image still works, from the start token or from a prefix.
    assert model.generate(classes=torch.tensor([0]), max_new_tokens=16).shape == (1, 17)
    assert model.generate(input_ids=torch.tensor([[16, 3, 4, 5]]), classes=torch.tensor([0])).shape == (1, 17)


def test_resized_embeddings_keep_new_ids_out_of_both_generate_paths(tmp_path):
    from codegpt import generate

    model = make_model()
    model.resize_token_embeddings(20)  # ids 17, 18, 19 are new special tokens
    assert model.config.vocab_size == 20 and model.lm_head.weight.shape[0] == 20
    with torch.no_grad():
        # Make the new ids overwhelmingly likely: without the ban, sampling would pick them.
        model.ln_f.weight.zero_()
        model.ln_f.bias.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[17:] = 5.0
    model.save_pretrained(tmp_path)
    classes = torch.tensor([0, 1, 2, 0])
    for m in (model, GPT.from_pretrained(tmp_path)):
        torch.manual_seed(0)
        assert m.generate(classes=classes, top_k=0)[:, 1:].lt(16).all()
        out = generate(m, classes=classes, generator=0)
        assert out.shape == (4, 17) and out[:, 1:].lt(16).all()
        codes = generate(m, classes=classes, generation_config=m.generation_config, generator=0)
        assert codes[:, 1:].lt(16).all()
    with pytest.raises(ValueError, match="new_num_tokens must be > start_token_id = 16 .*got 16"):
        model.resize_token_embeddings(16)  # would drop the start token
    assert model.config.vocab_size == 20


def test_trainer_with_gradient_accumulation_logs_mean_loss(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = make_model().train()
    ids, classes = random_batch(model.config, batch=8, seed=5)
    rows = [{"input_ids": ids[i], "labels": ids[i], "classes": classes[i]} for i in range(8)]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        max_steps=2, learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=True, seed=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2
    # A fresh model's loss is about ln(vocab); the sum of two micro-batches would be about twice that.
    assert all(abs(loss - torch.log(torch.tensor(17.0)).item()) < 0.6 for loss in losses), losses


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors before any compute
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cond_model():
    return make_model()


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda ids, c: dict(input_ids=ids.float(), classes=c), TypeError, "input_ids"),
        (lambda ids, c: dict(input_ids=ids - 1, classes=c), ValueError, "input_ids"),  # -1
        (lambda ids, c: dict(input_ids=ids.clamp(max=0) + 17, classes=c), ValueError, "input_ids"),
        (lambda ids, c: dict(input_ids=torch.cat([ids, ids], 1), classes=c), ValueError, "too long"),
        (lambda ids, c: dict(input_ids=ids[0], classes=c), ValueError, "input_ids"),
        (lambda ids, c: dict(input_ids=ids, classes=c + 3), ValueError, "classes"),
        (lambda ids, c: dict(input_ids=ids, classes=c - 5), ValueError, "classes"),
        (lambda ids, c: dict(input_ids=ids, classes=c[:2]), ValueError, "classes"),
        (lambda ids, c: dict(input_ids=ids, classes=c.float()), TypeError, "classes"),
        (lambda ids, c: dict(input_ids=ids, classes=[0, 1, 2]), TypeError, "classes"),
        (lambda ids, c: dict(input_ids=ids, classes=c, labels=ids[:, :-1]), ValueError, "labels"),
        (lambda ids, c: dict(input_ids=ids, classes=c, labels=ids + 100), ValueError, "labels"),
        (lambda ids, c: dict(input_ids=ids, classes=c, attention_mask=torch.ones(3, 4)), ValueError,
         "attention_mask"),
    ],
)
def test_bad_input_raises_clear_error(cond_model, make, error, match):
    ids, classes = random_batch(cond_model.config)
    with pytest.raises(error, match=match):
        cond_model(**make(ids, classes))


def test_classes_on_unconditional_model_is_rejected():
    model = make_model(class_conditional=False, num_classes=0)
    ids, _ = random_batch(model.config)
    with pytest.raises(ValueError, match="unconditional"):
        model(ids, classes=torch.tensor([0, 0, 0]))


def test_too_long_after_cache_is_rejected(cond_model):
    ids, classes = random_batch(cond_model.config)
    cache = cond_model(ids[:, :10], classes=classes, use_cache=True).cache
    with pytest.raises(ValueError, match="too long"):
        cond_model(ids[:, :8], classes=classes, cache=cache)


# ---------------------------------------------------------------------------------------------
# Caches of every kind
# ---------------------------------------------------------------------------------------------


def make_cache(kind: str, config: GPTConfig):
    from transformers import DynamicCache, StaticCache

    if kind == "dynamic":
        return DynamicCache()
    return StaticCache(config=config, max_cache_len=config.max_position_embeddings)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_cache_prefill_then_token_by_token_matches_uncached(kind, impl):
    model = make_model()
    model.config._attn_implementation = impl
    ids, classes = random_batch(model.config)
    full = model(ids, classes=classes, use_cache=False).logits
    for prefill in (1, 6):  # a start token alone, or a prompt
        cache = make_cache(kind, model.config)
        steps = [model(ids[:, :prefill], classes=classes, cache=cache).logits]
        steps += [model(ids[:, t : t + 1], classes=classes, cache=cache).logits for t in range(prefill, ids.shape[1])]
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)
    # and the whole sequence in one call
    torch.testing.assert_close(model(ids, classes=classes, cache=make_cache(kind, model.config)).logits, full,
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_cache_with_left_padding_matches_unpadded_rows(kind):
    model = make_model()
    ids, classes = random_batch(model.config, batch=2, length=10)
    pad = 3
    padded = torch.cat([torch.zeros(2, pad, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(2, pad, dtype=torch.long), torch.ones(2, 10, dtype=torch.long)], 1)
    mask[1, :pad] = 1  # row 1 has no padding: its "pad" tokens are real
    padded[1, :pad] = ids[1, 1 : pad + 1]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = make_cache(kind, model.config)
    steps = [model(padded[:, :6], classes=classes, attention_mask=mask[:, :6], position_ids=positions[:, :6],
                   cache=cache).logits]
    for t in range(6, padded.shape[1]):
        steps.append(model(padded[:, t : t + 1], classes=classes, attention_mask=mask[:, : t + 1],
                           position_ids=positions[:, t : t + 1], cache=cache).logits)
    cached = torch.cat(steps, 1)
    uncached = model(padded, classes=classes, attention_mask=mask, position_ids=positions, use_cache=False).logits
    torch.testing.assert_close(cached[:, pad:], uncached[:, pad:], rtol=0, atol=1e-5)
    torch.testing.assert_close(cached[0, pad:], model(ids[:1], classes=classes[:1]).logits[0], rtol=0, atol=1e-5)


def test_generate_with_static_cache_equals_default_cache():
    model = make_model()
    classes = torch.tensor([0, 2, 1])
    default = model.generate(classes=classes, do_sample=False)
    static = model.generate(classes=classes, do_sample=False, cache_implementation="static")
    assert torch.equal(static, default)
    # left-padded prompts too
    prompts = torch.tensor([[0, 0, 16, 3], [16, 5, 7, 1]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    kw = dict(input_ids=prompts, attention_mask=mask, classes=classes[:2], do_sample=False, max_new_tokens=6)
    assert torch.equal(model.generate(**kw, cache_implementation="static"), model.generate(**kw))


# ---------------------------------------------------------------------------------------------
# generate(): every strategy, with classes
# ---------------------------------------------------------------------------------------------


def greedy_by_hand(model: GPT, prompt: torch.Tensor, classes: torch.Tensor, new: int) -> torch.Tensor:
    seq = prompt
    for _ in range(new):
        logits = model(seq, classes=classes, use_cache=False).logits[:, -1]
        logits[:, model.config.codebook_size :] = float("-inf")  # special ids are never sampled
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    return seq


def test_config_declares_no_pad_or_eos_token():
    cfg = make_config()
    assert cfg.pad_token_id is None and cfg.eos_token_id is None
    assert GPT(cfg).generation_config.eos_token_id is None


def test_generate_greedy_equals_argmax_loop():
    model = make_model()
    classes = torch.tensor([0, 2, 1])
    start = torch.full((3, 1), model.config.start_token_id)
    out = model.generate(classes=classes, do_sample=False)
    assert torch.equal(out, greedy_by_hand(model, start, classes, model.config.seq_len))
    assert not torch.equal(out[0], model.generate(classes=torch.tensor([1]), do_sample=False)[0])


@pytest.mark.parametrize("num_beams", [1, 3])  # sampling, beam sampling
def test_generate_sampling_is_seeded_and_expands_classes(num_beams):
    model = make_model()
    classes = torch.tensor([0, 2])
    start = torch.full((6, 1), model.config.start_token_id)

    def sample(**kw):
        torch.manual_seed(5)
        return model.generate(do_sample=True, top_k=0, num_beams=num_beams, max_new_tokens=6, **kw)

    out = sample(classes=classes, num_return_sequences=3)
    assert out.shape == (6, 7) and (out[:, 1:] < model.config.codebook_size).all()
    if num_beams == 1:  # one row per returned sequence, each with its prompt's class
        assert torch.equal(out, sample(input_ids=start, classes=classes.repeat_interleave(3)))
    assert torch.equal(out, sample(classes=classes, num_return_sequences=3))


def test_generate_beam_search_scores_are_the_model_log_probs():
    model = make_model()
    classes = torch.tensor([0, 2])
    out = model.generate(classes=classes, do_sample=False, num_beams=3, num_return_sequences=2, max_new_tokens=5,
                         length_penalty=0.0, return_dict_in_generate=True, output_scores=True)
    seqs = out.sequences
    assert seqs.shape == (4, 6)
    logp = F.log_softmax(model(seqs, classes=classes.repeat_interleave(2)).logits[:, :-1], -1)
    by_model = logp.gather(-1, seqs[:, 1:, None])[..., 0].sum(-1)
    torch.testing.assert_close(out.sequences_scores, by_model, rtol=1e-4, atol=1e-4)
    assert (out.sequences_scores[0::2] >= out.sequences_scores[1::2]).all()  # best beam first


def test_generate_assisted_decoding_equals_greedy():
    model = make_model()
    assistant = make_model(seed=3)  # another prior of the same kind: a draft, not the answer
    classes = torch.tensor([1])
    out = model.generate(classes=classes, do_sample=False, assistant_model=assistant)
    assert torch.equal(out, model.generate(classes=classes, do_sample=False))


def test_generate_return_dict_with_scores_logits_attentions_hidden_states():
    model = make_model()
    model.set_attn_implementation("eager")
    classes = torch.tensor([0, 2])
    out = model.generate(classes=classes, do_sample=False, max_new_tokens=4, return_dict_in_generate=True,
                         output_scores=True, output_logits=True, output_attentions=True, output_hidden_states=True)
    L = model.config.num_layers
    assert out.sequences.shape == (2, 5)
    assert len(out.scores) == len(out.logits) == len(out.attentions) == len(out.hidden_states) == 4
    first = model(out.sequences[:, :1], classes=classes).logits[:, -1]
    torch.testing.assert_close(out.logits[0], first, rtol=0, atol=1e-5)
    assert torch.isinf(out.scores[0][:, model.config.codebook_size :]).all()  # special ids suppressed
    assert len(out.attentions[0]) == L and out.attentions[-1][0].shape == (2, 4, 1, 4)
    assert len(out.hidden_states[0]) == L + 1 and out.hidden_states[-1][0].shape == (2, 1, 32)


def test_generate_left_padded_batch_equals_each_row_alone():
    model = make_model()
    prompts = [torch.tensor([16, 4, 9, 2]), torch.tensor([16, 7])]
    classes = torch.tensor([2, 0])
    batch = torch.tensor([[16, 4, 9, 2], [0, 0, 16, 7]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    out = model.generate(input_ids=batch, attention_mask=mask, classes=classes, do_sample=False, max_new_tokens=5)
    for row, (prompt, cls) in enumerate(zip(prompts, classes, strict=True)):
        alone = model.generate(input_ids=prompt[None], classes=cls[None], do_sample=False, max_new_tokens=5)
        assert torch.equal(out[row, -5:], alone[0, -5:]), row


# ---------------------------------------------------------------------------------------------
# Outputs and keywords
# ---------------------------------------------------------------------------------------------


def test_return_dict_false_returns_the_transformers_tuple():
    model = make_model()
    ids, classes = random_batch(model.config)
    out = model(ids, labels=ids, classes=classes)
    loss, logits, cache = model(ids, labels=ids, classes=classes, return_dict=False)
    assert torch.equal(loss, out.loss) and torch.equal(logits, out.logits) and cache.get_seq_length() == 17
    (logits_only,) = model(ids, classes=classes, use_cache=False, return_dict=False)
    assert torch.equal(logits_only, out.logits)
    model.config.return_dict = False  # the config's default is honoured
    assert isinstance(model(ids, classes=classes), tuple)
    model.config.return_dict = True
    logits, loss = model(ids, labels=ids, classes=classes)  # the default output still unpacks as the seed's
    assert torch.equal(loss, out.loss)


def test_output_flags_fall_back_to_the_config():
    model = make_model()
    model.set_attn_implementation("eager")
    ids, classes = random_batch(model.config, length=5)
    out = model(ids, classes=classes)
    assert out.attentions is None and out.hidden_states is None
    model.config.output_attentions = True
    model.config.output_hidden_states = True
    out = model(ids, classes=classes)
    assert len(out.attentions) == 2 and len(out.hidden_states) == 3
    assert model(ids, classes=classes, output_attentions=False).attentions is None


def test_unknown_keywords_raise_type_error(cond_model):
    ids, classes = random_batch(cond_model.config)
    with pytest.raises(TypeError, match="class_ids"):
        cond_model(ids, class_ids=classes)
    with pytest.raises(TypeError, match="label"):
        cond_model(ids, classes=classes, label=ids)


def test_shift_labels_are_used_instead_of_labels(cond_model):
    ids, classes = random_batch(cond_model.config)
    other = torch.roll(ids, 1, dims=0)
    shifted = F.pad(other[:, 1:], (0, 1), value=-100)
    expected = cond_model(ids, classes=classes, labels=other).loss
    # Trainer's context parallelism passes both: the pre-shifted targets win.
    loss = cond_model(ids, classes=classes, labels=ids, shift_labels=shifted).loss
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    counted = (shifted != -100).sum()
    summed = cond_model(ids, classes=classes, shift_labels=shifted, num_items_in_batch=counted * 2).loss
    torch.testing.assert_close(summed, expected / 2, rtol=1e-6, atol=1e-6)


def test_logits_to_keep_computes_the_last_positions_only(cond_model):
    ids, classes = random_batch(cond_model.config)
    full = cond_model(ids, labels=ids, classes=classes)
    last = cond_model(ids, classes=classes, logits_to_keep=1).logits
    assert last.shape == (3, 1, 17)
    torch.testing.assert_close(last, full.logits[:, -1:], rtol=0, atol=1e-6)
    picked = cond_model(ids, classes=classes, logits_to_keep=torch.tensor([0, 4])).logits
    torch.testing.assert_close(picked, full.logits[:, [0, 4]], rtol=0, atol=1e-6)
    # 0 keeps everything, as in transformers
    torch.testing.assert_close(cond_model(ids, labels=ids, classes=classes, logits_to_keep=0).loss, full.loss)


def test_inputs_embeds_equal_input_ids(cond_model):
    ids, classes = random_batch(cond_model.config)
    expected = cond_model(ids, classes=classes).logits
    torch.testing.assert_close(cond_model(inputs_embeds=cond_model.wte(ids), classes=classes).logits, expected)
    with pytest.raises(ValueError, match="inputs_embeds"):
        cond_model(ids, inputs_embeds=cond_model.wte(ids), classes=classes)


def test_past_key_values_and_cache_position_keywords(cond_model):
    from codegpt.modeling_codegpt import _CACHE_FIELD

    ids, classes = random_batch(cond_model.config)
    full = cond_model(ids, classes=classes).logits
    cache = cond_model(ids[:, :5], classes=classes).cache
    renamed = _CACHE_FIELD == "cache"  # transformers' own deprecation where the installed version renamed it
    with pytest.warns(FutureWarning, match="past_key_values") if renamed else contextlib.nullcontext():
        out = cond_model(ids[:, 5:9], classes=classes, past_key_values=cache, cache_position=torch.arange(5, 9))
    torch.testing.assert_close(out.logits, full[:, 5:9], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Checkpointing, compile, export, config attributes
# ---------------------------------------------------------------------------------------------


# (offload=True pins host memory: it needs an accelerator, whatever the model)
@pytest.mark.parametrize("option", ["reentrant", "non-reentrant", "every-2nd-layer"])
def test_gradient_checkpointing_options_through_transformers(option):
    from transformers.modeling_layers import GradientCheckpointingLayer

    ids, classes = random_batch(make_config())

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = make_model().train()
        if checkpointing:
            assert all(isinstance(block, GradientCheckpointingLayer) for block in model.h)
            if option in ("reentrant", "non-reentrant"):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)  # 5.x prefers activation_checkpointing_enable
                    kwargs = {"use_reentrant": option == "reentrant"}
                    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
                assert all(block.gradient_checkpointing for block in model.h)
            elif not hasattr(model, "activation_checkpointing_enable"):
                pytest.skip("every_n_layers arrived with activation_checkpointing_enable (5.x)")
            else:
                model.activation_checkpointing_enable(every_n_layers=2)
                assert [block.gradient_checkpointing for block in model.h] == [True, False]
        torch.manual_seed(123)
        model(ids, labels=ids, classes=classes, use_cache=True).loss.backward()
        return {n: p.grad for n, p in model.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_forward_reads_no_values_off_cpu():
    """On an accelerator, reading a value is a host sync: forward must check shapes only. The meta
    device has no values at all, so any read fails there."""
    model = make_model().to("meta")
    ids, classes = random_batch(model.config)
    out = model(ids.to("meta"), labels=ids.to("meta"), classes=classes.to("meta"), attention_mask=torch.ones(
        3, 17, dtype=torch.long, device="meta"))
    assert out.logits.shape == (3, 17, 17) and out.logits.device.type == "meta"
    with pytest.raises(ValueError, match="classes"):  # shapes are still checked
        model(ids.to("meta"), classes=classes[:2].to("meta"))


def test_torch_export_with_static_and_dynamic_batch(cond_model):
    ids, classes = random_batch(cond_model.config)
    expected = cond_model(ids, classes=classes).logits
    kwargs = {"classes": classes, "use_cache": False}
    exported = torch.export.export(cond_model, (ids,), kwargs)
    torch.testing.assert_close(exported.module()(ids, **kwargs).logits, expected)
    batch = torch.export.Dim("batch", min=1, max=64)
    shapes = {"input_ids": {0: batch}, "classes": {0: batch}, "use_cache": None}
    exported = torch.export.export(cond_model, (ids,), kwargs, dynamic_shapes=shapes)
    out = exported.module()(ids[:2], classes=classes[:2], use_cache=False).logits
    torch.testing.assert_close(out, expected[:2])


def test_compile_fullgraph_forward_and_static_cache_decode_step():
    model = make_model()
    assert model._can_compile_fullgraph
    ids, classes = random_batch(model.config)
    full = model(ids, classes=classes).logits
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(ids, classes=classes).logits, full, rtol=0, atol=1e-5)
    cache = make_cache("static", model.config)
    model(ids[:, :8], classes=classes, cache=cache)  # prefill, not compiled
    for t in (8, 9):  # two steps: the second reuses the graph
        step = compiled(ids[:, t : t + 1], classes=classes, cache=cache).logits
        torch.testing.assert_close(step, full[:, t : t + 1], rtol=0, atol=1e-5)


def test_max_position_embeddings_is_settable():
    cfg = make_config()
    cfg.max_position_embeddings = 9
    assert cfg.seq_len == 8 and cfg.max_position_embeddings == 9
    assert make_config(seq_len=None, max_position_embeddings=33).seq_len == 32
    with pytest.raises(ValueError, match="max_position_embeddings"):
        make_config(max_position_embeddings=40)  # seq_len=16 says 17
    with pytest.raises(ValueError, match="max_position_embeddings"):
        cfg.max_position_embeddings = 1


def test_base_model_is_the_model(tmp_path):
    model = make_model()
    assert model.base_model is model
    assert model.base_model_prefix == "" or isinstance(getattr(model, model.base_model_prefix, None), torch.nn.Module)
