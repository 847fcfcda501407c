"""Sampling images from a codegpt :class:`~codegpt.GPT`: ``generate()`` and its fast KV-cache decoder.

Read top to bottom, in LlamaGen's functional style:

1. checks of the model and of every argument, all before any compute;
2. ``KVDecoder``: the model's own weights driven directly over a cache preallocated for the whole
   image (``prefill`` the prompt, then one ``step`` per token);
3. ``generate``: the loop. Each step turns the decoder's logits into the next code with transformers'
   ``LogitsProcessor`` machinery: guidance, the ban on special tokens, the user's processors, then the
   temperature / top-k / top-p warpers, in the order ``model.generate`` applies them.

Why a decoder of our own rather than ``model(..., cache=DynamicCache())``: the image length is known up
front, so the cache can be allocated once and written in place (a ``DynamicCache`` concatenates, i.e.
copies the whole cache, at every step), attention can run over the filled prefix only (a static cache
attends over every slot), and a decode step becomes a short fixed list of tensor ops with no module
dispatch, no validation and no mask building.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    LogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .modeling_codegpt import ClassEmbedding

__all__ = ["KVDecoder", "generate", "to_grid"]

# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_knobs(
    temperature: float, top_k: int | None, top_p: float | None, guidance_scale: float | None
) -> None:
    if not _is_number(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 0):
        raise ValueError(f"top_k must be None or an int >= 0 (0 or None is off), got {top_k!r}")
    if top_p is not None and (not _is_number(top_p) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be None or a float in (0, 1] (1 or None is off), got {top_p!r}")
    if guidance_scale is not None and (not _is_number(guidance_scale) or guidance_scale < 0):
        raise ValueError(
            f"guidance_scale must be None or a finite number >= 0 (None or 1 is off), got {guidance_scale!r}"
        )


def _check_int_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {value.dtype}")
    return value


def _resolve_batch(
    model: nn.Module,
    input_ids: torch.Tensor | None,
    classes: torch.Tensor | Sequence[int] | int | None,
    num_samples: int | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate the prompt and the classes; return them as (B, T) and (B,) long tensors on ``device``.

    The batch size comes from ``input_ids``, else from ``classes``, else from ``num_samples`` (default
    1); whichever of them are given must agree.
    """
    cfg = model.config
    P = cfg.seq_len + 1
    if num_samples is not None and (not _is_int(num_samples) or num_samples < 1):
        raise ValueError(f"num_samples must be None or an int >= 1, got {num_samples!r}")
    num_samples = None if num_samples is None else int(num_samples)

    if classes is not None:
        if not cfg.class_conditional:
            raise ValueError(
                "classes was given to an unconditional model (config.class_conditional=False); pass classes=None"
            )
        if _is_int(classes):
            classes = torch.tensor([int(classes)])
            if num_samples is not None:  # one class for the whole batch
                classes = classes.expand(num_samples)
            elif input_ids is not None:
                classes = classes.expand(input_ids.shape[0])
        elif isinstance(classes, (list, tuple)):
            classes = torch.tensor(classes) if classes else torch.empty(0, dtype=torch.long)
        _check_int_tensor("classes", classes)
        if classes.dim() != 1 or classes.shape[0] == 0:
            raise ValueError(f"classes must have shape (batch,) with batch >= 1, got {tuple(classes.shape)}")
        lo, hi = int(classes.min()), int(classes.max())
        if lo < 0 or hi > cfg.num_classes:
            raise ValueError(
                f"classes must be in [0, {cfg.num_classes}) (num_classes), or {cfg.num_classes} for the "
                f"null class, got {lo if lo < 0 else hi}"
            )

    if input_ids is None:
        B = classes.shape[0] if classes is not None else (num_samples or 1)
        input_ids = torch.full((B, 1), cfg.start_token_id, dtype=torch.long)
    else:
        _check_int_tensor("input_ids", input_ids)
        if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(
                "input_ids must have shape (batch, length) with batch, length >= 1 (the start token, then "
                f"the codes of a prefix), got {tuple(input_ids.shape)}"
            )
        B, T = input_ids.shape
        if T > P:
            raise ValueError(
                f"input_ids is too long: {T} tokens, but the model holds seq_len + 1 = {P} "
                "(the start token plus one image)"
            )
        if bool((input_ids[:, 0] != cfg.start_token_id).any()):
            raise ValueError(
                f"input_ids must start with the start token (config.start_token_id={cfg.start_token_id}) "
                f"in every row, got {input_ids[:, 0].tolist()[:8]} in column 0"
            )
        if T > 1:
            lo, hi = int(input_ids[:, 1:].min()), int(input_ids[:, 1:].max())
            if lo < 0 or hi >= cfg.codebook_size:
                raise ValueError(
                    f"input_ids after the start token must be codes in [0, {cfg.codebook_size}) "
                    f"(codebook_size), got {lo if lo < 0 else hi}"
                )
    B = input_ids.shape[0]
    if classes is not None and classes.shape[0] != B:
        source = "input_ids" if num_samples is None else "num_samples"
        raise ValueError(f"classes has {classes.shape[0]} rows but {source} asks for a batch of {B}")
    if num_samples is not None and num_samples != B:
        source = "input_ids" if classes is None else "classes"
        raise ValueError(f"num_samples={num_samples} does not match the batch of {B} given by {source}")
    classes = None if classes is None else classes.to(device=device, dtype=torch.long)
    return input_ids.to(device=device, dtype=torch.long), classes


def _as_generator(generator: torch.Generator | int | None, device: torch.device) -> torch.Generator | None:
    if generator is None or isinstance(generator, torch.Generator):
        if generator is not None and generator.device.type != device.type:
            raise ValueError(
                f"generator is on {generator.device} but the model is on {device}; "
                f"create it with torch.Generator(device={str(device)!r})"
            )
        return generator
    if _is_int(generator):
        return torch.Generator(device=device).manual_seed(int(generator))
    raise TypeError(f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}")


# ---------------------------------------------------------------------------------------------
# The decoder
# ---------------------------------------------------------------------------------------------


def _plain(module: object, kind: type, where: str, bias: bool = True) -> None:
    """The decoder reads weights and calls the functional ops itself, so it must refuse anything that
    would change what a module computes: subclasses (quantised or LoRA layers), hooks (accelerate
    offloading), a patched forward."""
    if getattr(type(module), "plain_base", type(module)) is not kind:  # codegpt.fast kernels compute the same
        raise NotImplementedError(
            f"the fast decoder supports {where} as a plain {kind.__name__}, got {type(module).__name__}; "
            "use model.generate() for modified models"
        )
    if issubclass(kind, nn.Linear) and (module.bias is not None) != bias:
        has = "a bias" if bias else "no bias"
        raise NotImplementedError(f"the fast decoder expects {where} with {has}, as GPT builds it")
    if module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__:
        raise NotImplementedError(
            f"{where} has forward hooks or a patched forward (e.g. accelerate offloading), which the fast "
            "decoder would bypass; use model.generate() instead"
        )


def _row_blocks(linear: nn.Linear, splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``linear``'s weight ``(out, in)`` and bias as ``(P, out / P, in)`` and ``(P, out / P, 1)`` views:
    ``P`` row blocks (``P = splits``, or 1 where ``out`` does not divide evenly)."""
    out_features = linear.weight.shape[0]
    P = splits if out_features % splits == 0 else 1
    return linear.weight.view(P, out_features // P, -1), linear.bias.view(P, out_features // P, 1)


def _linear_t(w: torch.Tensor, b: torch.Tensor | None, h_t: torch.Tensor) -> torch.Tensor:
    """``W @ h_t (+ b)`` on ``_row_blocks`` views: ``(P, out / P, in)`` @ ``(in, rows)`` -> ``(out, rows)``."""
    P, rows_per_block, fan_in = w.shape
    h = h_t.expand(P, fan_in, h_t.shape[1])
    out = torch.bmm(w, h) if b is None else torch.baddbmm(b, w, h)
    return out.view(P * rows_per_block, -1)


def _attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One query per head over its filled keys: q ``(N, 1, hs)``, already scaled by 1/sqrt(hs), and
    k, v ``(N, S, hs)``; returns ``(N, 1, hs)``."""
    return torch.bmm(torch.bmm(q, k.transpose(1, 2)).softmax(-1), v)  # (N, 1, S) weights in between


class KVDecoder:
    """Runs a codegpt GPT token by token over a KV cache preallocated for the whole image.

    The cache is one tensor ``(L, 2, B, nh, P, hs)`` (layers, key/value, batch, heads, positions, head
    size) with ``P = length``, ``seq_len + 1`` by default. ``prefill`` writes the prompt's keys and
    values at positions ``0 .. T-1``; ``step`` writes one position and attends over the filled prefix
    only. Both return the last position's logits ``(B, vocab_size)``: the only ones sampling needs.

    Dropout is off whatever ``model.training`` says: sampling is inference. Build and run it under
    ``torch.inference_mode()`` (as ``generate`` does), or autograd records every step.

    Args:
        model: a codegpt ``GPT`` (its own unmodified ``Linear`` / ``nn.LayerNorm`` / ``nn.Embedding`` modules).
        classes: ``(B,)`` class ids of a class-conditional model (``None``: the null class).
        batch_size: rows of the cache; the length of ``classes`` when given.
        length: positions to hold, at most ``seq_len + 1``: the prompt plus every token fed back.
    """

    def __init__(
        self, model: nn.Module, batch_size: int, classes: torch.Tensor | None = None, length: int | None = None
    ) -> None:
        cfg = model.config
        if getattr(cfg, "model_type", None) != "codegpt":
            raise NotImplementedError(f"the fast decoder needs a codegpt GPT, got {type(model).__name__}")
        wte, wpe, ln_f, head = model.wte, model.wpe, model.ln_f, model.lm_head
        for module, kind, where in ((wte, nn.Embedding, "wte"), (wpe, nn.Embedding, "wpe"),
                                    (ln_f, nn.LayerNorm, "ln_f")):
            _plain(module, kind, where)
        _plain(head, nn.Linear, "lm_head", bias=False)
        devices = {p.device for p in model.parameters()}
        if len(devices) != 1 or next(iter(devices)).type == "meta":
            raise NotImplementedError(f"the fast decoder needs every parameter on one device, got {devices}")
        self.device = next(iter(devices))
        # Split each weight's rows into one block per CPU thread: a batched matmul runs the blocks
        # on all cores, where a single matmul with a handful of rows (a matrix-vector product at
        # batch 1) keeps to one. Accelerators parallelise inside one matmul already.
        splits = torch.get_num_threads() if self.device.type == "cpu" else 1
        weights = []
        for i, block in enumerate(model.h):
            attn, mlp = block.attn, block.mlp
            for module, kind, where in (
                (block.ln_1, nn.LayerNorm, "ln_1"), (attn.qkv, nn.Linear, "attn.qkv"),
                (attn.proj, nn.Linear, "attn.proj"), (block.ln_2, nn.LayerNorm, "ln_2"),
                (mlp.fc, nn.Linear, "mlp.fc"), (mlp.act, nn.GELU, "mlp.act"), (mlp.proj, nn.Linear, "mlp.proj"),
            ):
                _plain(module, kind, f"h[{i}].{where}")
            # One flat tuple per layer (views of the parameters, no copies): a decode step is short
            # enough that module attribute lookups show up next to the matmuls.
            weights.append((
                block.ln_1.weight, block.ln_1.bias, block.ln_1.eps,
                *_row_blocks(attn.qkv, splits), *_row_blocks(attn.proj, splits),
                block.ln_2.weight, block.ln_2.bias, block.ln_2.eps,
                *_row_blocks(mlp.fc, splits), mlp.act.approximate, *_row_blocks(mlp.proj, splits),
            ))
        self.dtype = wte.weight.dtype
        self.B, self.P = batch_size, min(length or cfg.seq_len + 1, cfg.seq_len + 1)
        self.C, self.nh = cfg.embed_dim, cfg.num_heads
        self.hs = self.C // self.nh
        self.wte, self.wpe = wte.weight, wpe.weight
        self.ln_f = (ln_f.weight, ln_f.bias, ln_f.eps)
        # The head in row blocks too. Its row count (codes + specials) is rarely a multiple of the
        # threads: pad with zero rows (a copy of at most a few MB) and drop their logits.
        self.V = head.weight.shape[0]
        padded = -(-self.V // splits) * splits
        w = head.weight
        if padded != self.V:
            w = torch.cat([w, w.new_zeros(padded - self.V, w.shape[1])])
        self.head = w.view(splits, padded // splits, self.C)
        # (L, 2, B, nh, P, hs): a layer's keys for one head are contiguous, so attending over the
        # filled prefix streams one block of memory per head.
        self.cache = torch.empty(
            len(weights), 2, self.B, self.nh, self.P, self.hs, device=self.device, dtype=self.dtype
        )
        # The class vector is the same at every position: look it up once. (B, 1, C)
        self.cls = None
        if model.cls_emb is not None:
            _plain(model.cls_emb, ClassEmbedding, "cls_emb")
            if classes is None:
                classes = torch.full((batch_size,), cfg.num_classes, dtype=torch.long, device=self.device)
            self.cls = F.embedding(classes.to(self.device), model.cls_emb.weight)[:, None, :]
        # Per layer: its (2, B, nh, P, hs) cache, the keys and values as (B nh, P, hs) views, weights.
        self.layers = [
            (kv, kv[0].view(-1, self.P, self.hs), kv[1].view(-1, self.P, self.hs), *w)  # k, v: (B nh, P, hs)
            for kv, w in zip(self.cache, weights, strict=True)
        ]
        # A decode step's attention on a CPU: two batched matmuls over (B * nh) heads beat SDPA's
        # fused kernel, whose fixed cost per (row, head) dominates a single query (10-20% faster at
        # batch 8 and 64 on 2 cores, equal at batch 1). Accelerators keep SDPA's decode kernels.
        self.bmm_attention = self.device.type == "cpu"
        self.scale = 1.0 / math.sqrt(self.hs)
        self.q = torch.empty(self.B * self.nh, 1, self.hs, device=self.device, dtype=self.dtype)  # scaled queries

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt ``(B, T)`` from position 0; returns the last position's logits ``(B, V)``."""
        return self._forward(input_ids, 0)

    def step(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """Feed one token per row ``(B,)`` at position ``pos``; returns its logits ``(B, V)``."""
        return self._forward(tokens[:, None], pos)

    def _forward(self, idx: torch.Tensor, pos: int) -> torch.Tensor:
        B, T = idx.shape
        C, nh, hs = self.C, self.nh, self.hs
        S = pos + T  # keys filled once this call has written its own
        if S > self.P:
            raise ValueError(f"position {S - 1} is beyond the cache's {self.P} positions")
        x = F.embedding(idx, self.wte) + self.wpe[pos:S]  # (B, T, C), summed in GPT.forward's order
        if self.cls is not None:
            x += self.cls
        x = x.view(B * T, C)  # the residual stream, one row per token
        # No past during a prefill, so SDPA's top-left causal mask is the right one; a decode step's
        # single query sees every filled key and needs no mask at all.
        is_causal = T > 1
        # Every linear layer runs as W @ h.T, (out, in) @ (in, rows), on row blocks of W (see
        # _row_blocks): with a handful of rows the weights are the memory traffic, and this reads
        # them on every core (2x faster at batch 1 on 2 cores than x @ W.T). Outputs come out
        # transposed, (out, rows); the ops that follow read them through .t() views.
        for kv, k, v, w1, b1, e1, wqkv, bqkv, wo, bo, w2, b2, e2, wfc, bfc, act, wp, bp in self.layers:
            h = F.layer_norm(x, (C,), w1, b1, e1)
            qkv = _linear_t(wqkv, bqkv, h.t()).t().view(B, T, 3, nh, hs).permute(2, 0, 3, 1, 4)
            kv.narrow(3, pos, T).copy_(qkv[1:])  # this call's keys and values, written in place
            if T == 1 and self.bmm_attention:
                q = torch.mul(qkv[0], self.scale, out=self.q.view(B, nh, 1, hs)).view(B * nh, 1, hs)  # contiguous
                y = _attend_one(q, k[:, :S], v[:, :S]).view(B, C)
            else:
                # SDPA's fused kernel wants the head size contiguous: q is tiny, copy it.
                q = qkv[0].contiguous()  # (B, nh, T, hs)
                k, v = k.view(B, nh, -1, hs)[:, :, :S], v.view(B, nh, -1, hs)[:, :, :S]
                y = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
                y = y.transpose(1, 2).reshape(B * T, C)
            x += _linear_t(wo, bo, y.t()).t()
            h = F.layer_norm(x, (C,), w2, b2, e2)
            # Row-major (in, rows) operands take a matmul path 2-7x slower than column-major ones
            # (the layout h.t() has): transpose the fc output into (rows, mlp) before the GELU.
            u = F.gelu(_linear_t(wfc, bfc, h.t()).t().contiguous(), approximate=act)  # (rows, mlp)
            x += _linear_t(wp, bp, u.t()).t()
        x = F.layer_norm(x.view(B, T, C)[:, -1], (C,), *self.ln_f)  # only the last position is sampled
        logits = _linear_t(self.head, None, x.t())  # (V', B), V' >= V: the padded rows last
        return logits[: self.V].t().contiguous()  # (B, V)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


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


def generate(
    model: nn.Module,
    input_ids: torch.Tensor | None = None,
    max_new_tokens: int | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    classes: torch.Tensor | Sequence[int] | int | None = None,
    guidance_scale: float | None = None,
    logits_processor: Iterable[LogitsProcessor | Callable] | None = None,
    generator: torch.Generator | int | None = None,
    num_samples: int | None = None,
) -> torch.LongTensor:
    r"""Sample codes from a codegpt GPT with a KV cache preallocated for the whole image.

    Returns the token ids ``(B, T + max_new_tokens)`` *including the prompt*: column 0 is the start
    token, then the prefix codes (if any), then the sampled codes, as ``model.generate`` returns them.
    With the default ``max_new_tokens`` the result is a whole image, ``(B, seq_len + 1)``; ``to_grid``
    drops the start token and reshapes it to ``(B, H, W)``.

    Each step applies, in ``model.generate``'s order: classifier-free guidance, the ban on special
    tokens (ids ``>= codebook_size``, the start token among them, are never sampled), the user's
    ``logits_processor`` list, then temperature, top-k and top-p (transformers' own warpers). Sampling
    is an inverse-CDF draw from the softmax; ``temperature=0`` takes the argmax instead.

    Args:
        model: a codegpt ``GPT``. Sampling runs without dropout whatever its train/eval mode.
        input_ids: ``(B, T)`` prompt: the start token, then the codes of a prefix in raster order (the
            first rows of an image, to complete the rest). ``None``: the start token alone.
        max_new_tokens: codes to sample; ``None`` fills the image (``seq_len + 1 - T``).
        temperature: ``> 0`` divides the logits; ``0`` is greedy (argmax).
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

    Raises:
        ValueError / TypeError: for any bad argument, before compute, naming it.
        NotImplementedError: for a model the fast decoder cannot drive (hooks, quantised layers).
    """
    if getattr(getattr(model, "config", None), "model_type", None) != "codegpt":
        raise TypeError(f"model must be a codegpt GPT, got {type(model).__name__}")
    _check_knobs(temperature, top_k, top_p, guidance_scale)
    cfg = model.config
    device = next(model.parameters()).device
    input_ids, classes = _resolve_batch(model, input_ids, classes, num_samples, device)
    B, T = input_ids.shape
    remaining = cfg.seq_len + 1 - T
    if max_new_tokens is None:
        max_new_tokens = remaining
    elif not _is_int(max_new_tokens) or not 0 <= max_new_tokens <= remaining:
        raise ValueError(
            f"max_new_tokens must be None or an int in [0, {remaining}] (seq_len + 1 - prompt length "
            f"{T}), got {max_new_tokens!r}"
        )
    max_new_tokens = int(max_new_tokens)
    guided = guidance_scale is not None and guidance_scale != 1
    if guided:
        if not cfg.class_conditional:
            raise ValueError(
                f"guidance_scale={guidance_scale} needs a class-conditional model "
                "(config.class_conditional=False); pass guidance_scale=None"
            )
        if classes is None:
            raise ValueError(
                f"guidance_scale={guidance_scale} needs classes: without them both halves of the guidance "
                "batch are the null class"
            )
    generator = _as_generator(generator, device)
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
        raise ValueError(
            f"tokens must have shape (batch, {H * W}) or (batch, {H * W + 1}) (start token first) for a "
            f"{H}x{W} grid, got {tuple(tokens.shape)}"
        )
    return tokens[:, -H * W :].reshape(-1, H, W)
