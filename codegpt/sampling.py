"""Sampling images from a codegpt :class:`~codegpt.GPT`: ``generate()``, in LlamaGen's functional style.

Every argument is checked first, before any compute (the fast decoder checks nothing, and the model's
forward may never run). Then ``codegpt.fast.KVDecoder`` runs the model over a KV cache (``prefill`` the
prompt, one ``step`` per token), and each step turns its logits into the next code with transformers'
``LogitsProcessor`` machinery, in the order ``model.generate`` applies it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    PretrainedConfig,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ._util import as_tensor, check_float
from .fast import KVDecoder
from .fast.decoder import input_device

__all__ = ["KVDecoder", "check_sampling_args", "generate", "to_grid"]


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_sampling_args(
    temperature: float, top_k: int | None, top_p: float | None, guidance_scale: float | None,
    config: PretrainedConfig | None = None,
) -> None:
    """Raise ``ValueError`` naming the first of the sampling knobs out of its range, or guidance that
    the model of ``config`` (when given) cannot take."""
    check_float("temperature", temperature, 0)
    if top_k is not None and (not _is_int(top_k) or top_k < 0):
        raise ValueError(f"top_k must be None or an int >= 0 (0 or None is off), got {top_k!r}")
    if top_p is not None:
        check_float("top_p", top_p, 0, 1, low_open=True)
    if guidance_scale is not None:
        check_float("guidance_scale", guidance_scale, 0)
        if guidance_scale != 1 and config is not None and not config.class_conditional:
            raise ValueError(f"guidance_scale={guidance_scale} needs a class-conditional model "
                             "(config.class_conditional=False); leave it unset (None)")


def _check_classes(
    cfg: PretrainedConfig, classes: torch.Tensor | Sequence[int] | int, batch: int | None
) -> torch.Tensor:
    """``classes`` as a ``(B,)`` tensor of ids in ``[0, num_classes]``; one int is repeated over
    ``batch`` rows when that is known (else one row)."""
    if not cfg.class_conditional:
        raise ValueError("classes was given to an unconditional model (config.class_conditional=False); "
                         "pass classes=None")
    if _is_int(classes):
        classes = torch.tensor([int(classes)]).expand(batch or 1)
    elif isinstance(classes, (list, tuple)):
        classes = torch.tensor(classes) if classes else torch.empty(0, dtype=torch.long)
    classes = as_tensor("classes", classes, integer=True)
    if classes.dim() != 1 or classes.shape[0] == 0:
        raise ValueError(f"classes must have shape (batch,) with batch >= 1, got {tuple(classes.shape)}")
    lo, hi = int(classes.min()), int(classes.max())
    if lo < 0 or hi > cfg.num_classes:
        raise ValueError(f"classes must be in [0, {cfg.num_classes}) (num_classes), or {cfg.num_classes} for "
                         f"the null class, got {lo if lo < 0 else hi}")
    return classes


def _check_prompt(cfg: PretrainedConfig, input_ids: object) -> torch.Tensor:
    """``input_ids`` as a ``(B, T)`` prompt: the start token, then codes (stricter than the model's own
    check, any id in the vocabulary), at most ``seq_len + 1`` long."""
    input_ids = as_tensor("input_ids", input_ids, integer=True)
    if input_ids.dim() != 2 or 0 in input_ids.shape:
        raise ValueError("input_ids must have shape (batch, length) with batch, length >= 1 (the start token, "
                         f"then the codes of a prefix), got {tuple(input_ids.shape)}")
    T, P = input_ids.shape[1], cfg.seq_len + 1
    if T > P:
        raise ValueError(f"input_ids is too long: {T} tokens, but the model holds seq_len + 1 = {P} "
                         "(the start token plus one image)")
    if bool((input_ids[:, 0] != cfg.start_token_id).any()):
        raise ValueError(f"input_ids must start with the start token (config.start_token_id={cfg.start_token_id}) "
                         f"in every row, got {input_ids[:, 0].tolist()[:8]} in column 0")
    if T > 1:
        lo, hi = int(input_ids[:, 1:].min()), int(input_ids[:, 1:].max())
        if lo < 0 or hi >= cfg.codebook_size:
            raise ValueError(f"input_ids after the start token must be codes in [0, {cfg.codebook_size}) "
                             f"(codebook_size), got {lo if lo < 0 else hi}")
    return input_ids


def _resolve_batch(
    cfg: PretrainedConfig,
    input_ids: torch.Tensor | None,
    classes: torch.Tensor | Sequence[int] | int | None,
    num_samples: int | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Check the prompt, the classes and ``num_samples``; return the first two as ``(B, T)`` and ``(B,)``
    long tensors on ``device``. Those given must agree on the batch size (1 when none is)."""
    if num_samples is not None and (not _is_int(num_samples) or num_samples < 1):
        raise ValueError(f"num_samples must be None or an int >= 1, got {num_samples!r}")
    sizes = {} if num_samples is None else {"num_samples": int(num_samples)}
    if input_ids is not None:
        input_ids = _check_prompt(cfg, input_ids)
        sizes["input_ids"] = input_ids.shape[0]
    if classes is not None:
        # One int is the class of the whole batch, however large the other arguments make it.
        classes = _check_classes(cfg, classes, next(iter(sizes.values()), None))
        sizes["classes"] = classes.shape[0]
    if len(set(sizes.values())) > 1:
        raise ValueError(f"{' and '.join(sizes)} must agree on the batch size, got {sizes}")
    if input_ids is None:
        input_ids = torch.full((next(iter(sizes.values()), 1), 1), cfg.start_token_id, dtype=torch.long)
    classes = None if classes is None else classes.to(device=device, dtype=torch.long)
    return input_ids.to(device=device, dtype=torch.long), classes


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of ``probs`` ``(B, V)``, by inverse CDF: one uniform per row, where
    ``torch.multinomial`` draws an exponential for every entry (B x V: 4% of a decode step at batch 8).

    The first index whose CDF exceeds the uniform is never a zero-probability entry (its CDF equals
    its predecessor's), so masked tokens are never drawn.
    """
    cdf = probs.cumsum(dim=-1)  # (B, V)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, dtype=cdf.dtype, device=cdf.device, generator=generator) * total
    idx = torch.searchsorted(cdf, u, right=True)  # (B, 1)
    # u * total can round up to total itself: take the last entry with positive probability then.
    last = (cdf < total).sum(dim=-1, keepdim=True)
    return torch.minimum(idx, last).squeeze(1)


# GenerationConfig settings that change what ``model.generate`` draws and that ``generate`` does not apply,
# each with its neutral value (None is always neutral): refused, never silently ignored.
_NOT_APPLIED = {
    "num_beams": 1, "penalty_alpha": 0, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "typical_p": 1.0,
    "min_p": 0, "epsilon_cutoff": 0, "eta_cutoff": 0, "top_h": None, "bad_words_ids": None, "sequence_bias": None,
    "dola_layers": None, "constraints": None, "force_words_ids": None, "watermarking_config": None,
}


def _from_generation_config(config: GenerationConfig) -> dict[str, Any]:
    """The settings ``config`` gives ``generate``, with transformers' meaning: ``do_sample`` False (or unset)
    is greedy, sampling without ``top_k`` is top-k 50. Unset fields are transformers' defaults, whatever the
    version (``model.generate`` would also fill them from the model's own config; 4.x even where set to a
    default, such as ``do_sample=False``)."""
    if not isinstance(config, GenerationConfig):
        raise TypeError(f"generation_config must be a transformers GenerationConfig, got {type(config).__name__}")
    for key, neutral in _NOT_APPLIED.items():
        value = getattr(config, key, None)
        if value is not None and value != neutral:
            raise ValueError(f"generation_config.{key}={value!r}: codegpt.generate samples (temperature, top_k, "
                             "top_p, guidance_scale) or decodes greedily, nothing else; use model.generate for it")
    sampled = bool(config.do_sample)
    return {
        "temperature": (1.0 if config.temperature is None else config.temperature) if sampled else 0.0,
        "top_k": (50 if config.top_k is None else config.top_k) if sampled else None,
        "top_p": config.top_p if sampled else None,
        "guidance_scale": config.guidance_scale,
        "max_new_tokens": config.max_new_tokens,
        "num_return_sequences": config.num_return_sequences,
        "suppress_tokens": list(config.suppress_tokens or []),
    }


def generate(
    model: nn.Module,
    input_ids: torch.Tensor | None = None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    classes: torch.Tensor | Sequence[int] | int | None = None,
    guidance_scale: float | None = None,
    logits_processor: Iterable[LogitsProcessor | Callable] | None = None,
    generator: torch.Generator | int | None = None,
    num_samples: int | None = None,
    num_return_sequences: int | None = None,
    generation_config: GenerationConfig | None = None,
) -> torch.LongTensor:
    r"""Sample codes from a codegpt GPT over a KV cache (``codegpt.fast.KVDecoder``).

    Returns the token ids ``(B, T + max_new_tokens)`` *including the prompt*: column 0 is the start
    token, then the prefix codes (if any), then the sampled codes, as ``model.generate`` returns them.
    With the default ``max_new_tokens`` the result is a whole image, ``(B, seq_len + 1)``; ``to_grid``
    drops the start token and reshapes it to ``(B, H, W)``.

    Each step applies, in ``model.generate``'s order: classifier-free guidance, the ban on special
    tokens (ids ``>= codebook_size``, the start token among them, are never sampled), the user's
    ``logits_processor`` list, then temperature, top-k and top-p (transformers' own warpers). Sampling
    is an inverse-CDF draw from the softmax; ``temperature=0`` takes the argmax instead.

    Args:
        model: a codegpt ``GPT``. Sampling runs without dropout whatever its train/eval mode. A model
            with hooks, adapters (e.g. LoRA) or layers the fast decoder does not know samples through
            its own forward (see ``codegpt.fast.unknown_part``): the same codes, more slowly.
        input_ids: ``(B, T)`` prompt: the start token, then the codes of a prefix in raster order (the
            first rows of an image, to complete the rest). ``None``: the start token alone.
        max_new_tokens: codes to sample; ``None`` fills the image (``seq_len + 1 - T``); more is refused.
        temperature: ``> 0`` divides the logits; ``0`` is greedy (argmax); ``None`` is 1.
        top_k: keep the ``top_k`` most likely codes; ``None`` or ``0`` is off; more than the codebook
            is the whole codebook.
        top_p: keep the smallest set of most likely codes whose probability reaches ``top_p``, in
            ``(0, 1]``; ``None`` or ``1`` is off.
        classes: ``(B,)`` class ids of a class-conditional model (a list, or one int for the whole
            batch, also work); ``num_classes`` or ``None`` is the null class (unconditional).
        guidance_scale: classifier-free guidance ``s >= 0``; ``None`` or ``1`` is off. Each step runs
            the batch twice in one forward, ``[classes; null class]``, and mixes **log-probabilities**,
            ``uncond + s * (cond - uncond)`` after a log-softmax of both halves, exactly as
            transformers' ``UnbatchedClassifierFreeGuidanceLogitsProcessor`` does: so greedy output
            equals ``model.generate(..., guidance_scale=s)``, and the warpers see log-probabilities.
        logits_processor: extra ``LogitsProcessor``\ s (any ``(input_ids, scores) -> scores``
            callables), applied after guidance and before the warpers; ``input_ids`` is the ``(B, t)``
            sequence so far, ``scores`` is ``(B, vocab_size)`` float32.
        generator: a ``torch.Generator`` on the model's device or an int seed: the same one gives the
            same samples. ``None`` uses torch's global RNG.
        num_samples: batch size when ``input_ids`` is None and ``classes`` is not a tensor.
        num_return_sequences: samples per prompt (per row of ``input_ids``/``classes``), side by side in the
            output as ``model.generate`` returns them; ``None`` is 1.
        generation_config: a ``transformers.GenerationConfig``, e.g. ``model.generation_config`` (the
            settings the model was saved or pushed with): its ``temperature``, ``top_k``, ``top_p``,
            ``guidance_scale``, ``max_new_tokens``, ``num_return_sequences`` and ``suppress_tokens`` apply
            unless given here (``top_k=0``, ``top_p=1``, ``guidance_scale=1`` turn them off). ``do_sample``
            False is greedy; sampling without ``top_k`` is top-k 50, as in transformers. Read as it is: unset
            fields are transformers' defaults, never the model's own config's. A setting that ``generate``
            does not apply (beams, penalties, other warpers) is refused.

    Raises:
        ValueError / TypeError: for any bad argument, before compute, naming it.
    """
    if getattr(getattr(model, "config", None), "model_type", None) != "codegpt":
        raise TypeError(f"model must be a codegpt GPT, got {type(model).__name__}")
    cfg = model.config
    suppressed: list[int] = []
    if generation_config is not None:  # what is given here wins over the config
        saved = _from_generation_config(generation_config)
        suppressed = sorted({int(t) for t in saved.pop("suppress_tokens") if 0 <= int(t) < cfg.codebook_size})
        given = dict(temperature=temperature, top_k=top_k, top_p=top_p, guidance_scale=guidance_scale,
                     max_new_tokens=max_new_tokens, num_return_sequences=num_return_sequences)
        temperature, top_k, top_p, guidance_scale, max_new_tokens, num_return_sequences = (
            saved[key] if value is None else value for key, value in given.items()
        )
    temperature = 1.0 if temperature is None else temperature
    check_sampling_args(temperature, top_k, top_p, guidance_scale, cfg)
    if num_return_sequences is not None and (not _is_int(num_return_sequences) or num_return_sequences < 1):
        raise ValueError(f"num_return_sequences must be None or an int >= 1, got {num_return_sequences!r}")
    device = input_device(model)
    input_ids, classes = _resolve_batch(cfg, input_ids, classes, num_samples, device)
    if num_return_sequences is not None and num_return_sequences > 1:  # each prompt's samples side by side
        input_ids = input_ids.repeat_interleave(int(num_return_sequences), dim=0)
        classes = None if classes is None else classes.repeat_interleave(int(num_return_sequences), dim=0)
    B, T = input_ids.shape
    remaining = cfg.seq_len + 1 - T
    if max_new_tokens is None:
        max_new_tokens = remaining
    elif not _is_int(max_new_tokens) or not 0 <= max_new_tokens <= remaining:
        raise ValueError(f"max_new_tokens must be None or an int in [0, {remaining}] (seq_len + 1 - prompt "
                         f"length {T}), got {max_new_tokens!r}")
    max_new_tokens = int(max_new_tokens)
    guided = guidance_scale is not None and guidance_scale != 1
    if guided and classes is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs classes: without them both halves of the "
                         "guidance batch are the null class")
    if _is_int(generator):
        generator = torch.Generator(device=device).manual_seed(int(generator))
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}")
    elif generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but the model is on {device}; "
                         f"create it with torch.Generator(device={str(device)!r})")
    user_processors = list(logits_processor or [])
    for p in user_processors:
        if not callable(p):
            raise TypeError(f"logits_processor must hold callables (input_ids, scores) -> scores, got {p!r}")

    # Warpers are called directly: LogitsProcessorList.__call__ inspects signatures at every step.
    greedy = temperature == 0
    warpers: list[LogitsProcessor] = []
    if not greedy:
        if temperature != 1:
            warpers.append(TemperatureLogitsWarper(float(temperature)))
        if top_k:
            warpers.append(TopKLogitsWarper(min(int(top_k), cfg.codebook_size)))
        if top_p is not None and top_p < 1:
            warpers.append(TopPLogitsWarper(float(top_p)))

    out = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=device)
    out[:, :T] = input_ids
    if max_new_tokens == 0:
        return out

    # The last sampled token is never fed back, so the cache holds one position less than the output.
    length = T + max_new_tokens - 1
    codebook_size = cfg.codebook_size
    with torch.inference_mode():
        if guided:
            # One doubled batch per step: rows 0..B-1 conditional, rows B..2B-1 the null class.
            null = torch.full_like(classes, cfg.num_classes)
            decoder = KVDecoder(model, 2 * B, torch.cat([classes, null]), length)
            logits = decoder.prefill(input_ids.repeat(2, 1))
        else:
            decoder = KVDecoder(model, B, classes, length)
            logits = decoder.prefill(input_ids)
        for t in range(T, T + max_new_tokens):
            scores = logits.float()  # (B or 2B, V); transformers processes scores in float32 too
            if guided:
                logp = scores.log_softmax(dim=-1)
                cond, uncond = logp[:B], logp[B:]
                scores = guidance_scale * (cond - uncond) + uncond
            scores[:, codebook_size:] = -math.inf  # special tokens are inputs only, never sampled
            if suppressed:
                scores[:, suppressed] = -math.inf  # the generation config's suppress_tokens among the codes
            seq = out[:, :t]
            for p in user_processors:
                scores = p(seq, scores)
            if greedy:
                next_tokens = scores.argmax(dim=-1)
            else:
                for w in warpers:
                    scores = w(seq, scores)
                next_tokens = _draw(scores.softmax(dim=-1), generator)
            out[:, t] = next_tokens
            if t + 1 < T + max_new_tokens:
                logits = decoder.step(next_tokens.repeat(2) if guided else next_tokens, t)
    return out


def to_grid(tokens: torch.Tensor, grid_shape: tuple[int, int]) -> torch.Tensor:
    """Codes of whole images as a ``(B, H, W)`` grid.

    ``tokens`` is either ``generate``'s output for whole images, ``(B, H*W + 1)`` with the start token in
    column 0 (dropped), or the codes alone, ``(B, H*W)``.
    """
    H, W = grid_shape
    if tokens.dim() != 2 or tokens.shape[1] not in (H * W, H * W + 1):
        raise ValueError(f"tokens must have shape (batch, {H * W}) or (batch, {H * W + 1}) (start token "
                         f"first) for a {H}x{W} grid, got {tuple(tokens.shape)}")
    return tokens[:, -H * W :].reshape(-1, H, W)
