"""The accelerator paths: the same equivalences as on a CPU, on CUDA (skipped where there is none).

On a GPU the decoder attends through SDPA rather than batched matmuls and the model runs in bf16 by
choice; these tests pin that the codes it samples and the logits it gives are the model's own there too.
"""

from __future__ import annotations

import pytest
import torch

from codegpt import GPT
from codegpt.fast import FastDecoder, KVDecoder, ModelDecoder
from codegpt.sampling import generate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA = torch.device("cuda")


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-4), (torch.bfloat16, 6e-2)])
def test_cuda_forward_matches_cpu_and_cached_steps_match_the_full_forward(dtype, atol, tiny_model, prefix_ids):
    model = tiny_model()
    ids = prefix_ids(model, 3, model.config.seq_len)
    classes = torch.tensor([0, 1, 2])
    with torch.no_grad():
        on_cpu = model(ids, classes=classes).logits
        model.to(CUDA, dtype)
        full = model(ids.to(CUDA), classes=classes.to(CUDA)).logits
        cached = model(ids[:, :5].to(CUDA), classes=classes.to(CUDA), use_cache=True)
        steps = [cached.logits[:, -1]]
        cache = cached.past_key_values
        for t in range(5, ids.shape[1]):
            out = model(ids[:, t : t + 1].to(CUDA), classes=classes.to(CUDA), past_key_values=cache, use_cache=True)
            steps.append(out.logits[:, -1])
            cache = out.past_key_values
    torch.testing.assert_close(full.float().cpu(), on_cpu, atol=atol, rtol=0)
    torch.testing.assert_close(torch.stack(steps, 1).float(), full[:, 4:].float(), atol=atol, rtol=0)


@pytest.mark.parametrize("path", [FastDecoder, ModelDecoder])
def test_cuda_decoders_match_the_full_forward(path, tiny_model, prefix_ids):
    model = tiny_model().to(CUDA)
    ids = prefix_ids(model, 2, model.config.seq_len).to(CUDA)
    classes = torch.tensor([2, 1], device=CUDA)
    with torch.no_grad():
        expected = model(ids, classes=classes).logits
    decoder = path(model, 2, classes)
    with torch.inference_mode():
        got = [decoder.prefill(ids[:, :3])] + [decoder.step(ids[:, t], t) for t in range(3, ids.shape[1])]
    torch.testing.assert_close(torch.stack(got, 1), expected[:, 2:], atol=1e-4, rtol=0)


def test_cuda_generate_is_seeded_and_the_same_on_both_decoder_paths(tiny_model, monkeypatch):
    model = tiny_model(sharpen=4.0).to(CUDA)
    assert KVDecoder(model, 1, None).fast  # a plain model on one device takes the fast path
    first = generate(model, classes=[0, 1, 2, 0], top_k=5, guidance_scale=2.0, generator=7)
    again = generate(model, classes=[0, 1, 2, 0], top_k=5, guidance_scale=2.0, generator=7)
    assert first.device.type == "cuda" and torch.equal(first, again)
    model.h[0].mlp.fc.register_forward_hook(lambda module, args, output: None)  # forces the model's forward
    assert not KVDecoder(model, 1, None).fast
    through_forward = generate(model, classes=[0, 1, 2, 0], top_k=5, guidance_scale=2.0, generator=7)
    # Same logits up to float rounding on the GPU: the draws agree everywhere but rarely at a tie.
    assert (through_forward == first).float().mean() > 0.95


def test_cuda_transformers_generate_with_static_cache_matches_dynamic(tiny_model, start_ids):
    model = tiny_model(sharpen=4.0).to(CUDA)
    ids = start_ids(model, 2).to(CUDA)
    kwargs = dict(classes=torch.tensor([0, 2], device=CUDA), do_sample=False, max_new_tokens=model.config.seq_len)
    dynamic = model.generate(ids, **kwargs)
    static = model.generate(ids, cache_implementation="static", **kwargs)
    assert torch.equal(dynamic, static)


def test_cuda_training_in_bf16_saves_a_model_that_loads_with_the_same_logits(tmp_path, learnable_dataset,
                                                                            tiny_config, fresh_accelerate_state):
    from codegpt.training import TrainingArguments, train

    dataset = learnable_dataset(tmp_path / "data")
    args = TrainingArguments(output_dir=tmp_path / "run", max_steps=6, per_device_batch_size=8, warmup_steps=1,
                             eval_every=3, save_every=3, progress=False, samples_per_class=1, mixed_precision="bf16")
    result = train(args, tiny_config(dataset), dataset, dataset)
    assert result.step == 6 and all(torch.isfinite(torch.tensor(e["loss_nats"])) for e in result.eval_history)
    loaded = GPT.from_pretrained(result.model_dir).to(CUDA).eval()
    again = GPT.from_pretrained(result.model_dir).eval()
    ids = torch.full((2, 1), loaded.config.start_token_id)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids.to(CUDA), classes=torch.tensor([0, 1], device=CUDA)).logits.cpu(),
                                   again(ids, classes=torch.tensor([0, 1])).logits, atol=1e-4, rtol=0)
