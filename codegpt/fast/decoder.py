"""The KV-cache decoder behind ``codegpt.generate``: ``prefill`` a prompt, then one ``step`` per token,
on the model's own modules (``FastDecoder``) or, for models with parts it does not know (hooks, adapters,
quantised layers, several devices), through the model's forward (``ModelDecoder``); see ``KVDecoder``.

Why a fast path of our own rather than ``model(..., cache=DynamicCache())``: the image length is known
up front, so the cache can be allocated once and written in place (a ``DynamicCache`` concatenates,
i.e. copies the whole cache, at every step), attention can run over the filled prefix only (a static
cache attends over every slot), and a decode step becomes a short fixed list of tensor ops with no
module dispatch, no validation and no mask building.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from .. import modeling_codegpt as modeling

__all__ = ["KVDecoder", "FastDecoder", "ModelDecoder", "plain_kind", "unknown_part"]

# The classes whose computation the fast path repeats: torch's with functional ops from their
# weights, the model's own by composing their parts as their forwards do (exact classes only: a
# subclass may compute differently).
_KNOWN = (nn.Linear, nn.LayerNorm, nn.Embedding, nn.GELU, nn.Dropout, nn.ModuleList, modeling.GPT,
          modeling.ClassEmbedding, modeling.CausalSelfAttention, modeling.MLP, modeling.TransformerBlock)


def plain_kind(module: nn.Module) -> type | None:
    """The known class whose computation ``module`` is, or ``None``: its own class, or the class a
    subclass declares in its own body as ``plain_base = <known class>`` (a CPU kernel that computes the
    same function, e.g. ``codegpt.fast.kernels``). The declaration is not inherited: a subclass of such
    a kernel (a LoRA layer built on it, say) is unknown again."""
    cls = type(module)
    base = cls.__dict__.get("plain_base", cls)
    return base if base in _KNOWN and issubclass(cls, base) else None


def unknown_part(model: nn.Module) -> str | None:
    """Why the fast path cannot drive ``model``, in words (the first thing it does not know), or
    ``None`` when it knows every part: the model is codegpt's ``GPT`` with exactly the modules it is
    built with, each of its kind (see ``plain_kind``), none with forward hooks or a patched forward,
    and the weights are plain tensors of one dtype on one device."""
    if type(model) is not modeling.GPT:
        return f"the model is a {type(model).__qualname__}, not codegpt's GPT"
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return "global forward hooks are registered (torch.nn.modules.module.register_module_forward_hook)"
    # Every module the model is built with, by name (as named_modules gives it), with its kind.
    expected = {"": modeling.GPT, "wte": nn.Embedding, "wpe": nn.Embedding, "drop": nn.Dropout, "h": nn.ModuleList,
                "ln_f": nn.LayerNorm, "lm_head": nn.Linear}
    if model.config.class_conditional:
        expected["cls_emb"] = modeling.ClassEmbedding
    block = {"": modeling.TransformerBlock, ".ln_1": nn.LayerNorm, ".attn": modeling.CausalSelfAttention,
             ".attn.qkv": nn.Linear, ".attn.proj": nn.Linear, ".attn.resid_dropout": nn.Dropout,
             ".ln_2": nn.LayerNorm, ".mlp": modeling.MLP, ".mlp.fc": nn.Linear, ".mlp.act": nn.GELU,
             ".mlp.proj": nn.Linear, ".mlp.dropout": nn.Dropout}
    for i in range(model.config.num_layers):
        expected.update((f"h.{i}{name}", kind) for name, kind in block.items())
    for name, module in model.named_modules():
        where, kind = name or "the model", expected.pop(name, None)
        if kind is None or plain_kind(module) is not kind:
            has = f"where the model has a {kind.__qualname__}" if kind else "a module the model is not built with"
            return f"{where} is a {type(module).__qualname__}, {has}"
        # Hooks (accelerate's offloading, PEFT's adapters, user probes) or a forward set on the
        # instance may change what the module computes; the fast path would bypass them.
        if module._forward_hooks or module._forward_pre_hooks or "forward" in vars(module):
            return f"{where} has forward hooks or a patched forward"
        if isinstance(module, nn.Embedding) and module.max_norm is not None:
            return f"{where} renormalises its rows (max_norm={module.max_norm})"
    if expected:
        return f"the model has no {next(iter(expected))}"
    params = dict(model.named_parameters())
    devices = {p.device for p in params.values()}
    if len(devices) != 1 or next(iter(devices)).type == "meta":
        return f"the weights are on {sorted(map(str, devices))}, not on one device"
    dtypes = {p.dtype for p in params.values()}
    if len(dtypes) != 1:
        return f"the weights mix dtypes {sorted(map(str, dtypes))}"
    for name, p in params.items():
        if type(p) not in (nn.Parameter, torch.Tensor):  # e.g. a quantised tensor subclass
            return f"{name} is a {type(p).__qualname__}, not a plain tensor"
    return None


def input_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: its first parameter's device (CPU when every weight is on the meta
    device, i.e. offloaded: accelerate's hooks then move the inputs themselves)."""
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


class KVDecoder:
    """Runs a codegpt GPT token by token over a KV cache, in eval mode: a ``FastDecoder`` when it knows
    every part of ``model``, else a ``ModelDecoder`` (``decoder.fast`` says which; a ``ModelDecoder``'s
    ``fallback_reason`` says why). Build and run it under ``torch.inference_mode()`` (as ``generate``
    does), or autograd records every step.

    Args:
        model: a codegpt ``GPT``.
        batch_size: rows of the cache; the length of ``classes`` when given.
        classes: ``(B,)`` class ids of a class-conditional model (``None``: the null class).
        length: positions to hold, at most ``seq_len + 1``: the prompt plus every token fed back.
    """

    fast: bool

    def __new__(cls, model: nn.Module, *args, **kwargs) -> KVDecoder:
        if cls is KVDecoder:  # the path is chosen here, once; __init__ then calls its _build
            cls = FastDecoder if unknown_part(model) is None else ModelDecoder
        return super().__new__(cls)

    def __init__(
        self, model: nn.Module, batch_size: int, classes: torch.Tensor | None = None, length: int | None = None
    ) -> None:
        cfg = getattr(model, "config", None)
        if getattr(cfg, "model_type", None) != "codegpt":
            raise TypeError(f"the decoder needs a codegpt GPT, got {type(model).__name__}")
        self.B, self.P = batch_size, min(length or cfg.seq_len + 1, cfg.seq_len + 1)
        self.device = input_device(model)
        if cfg.class_conditional and classes is None:  # the null class
            classes = torch.full((batch_size,), cfg.num_classes, dtype=torch.long)
        self._build(model, cfg, None if classes is None else classes.to(self.device))

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt ``(B, T)`` from position 0; returns the last position's logits ``(B, V)``."""
        return self._forward(input_ids, 0)

    def step(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """Feed one token per row ``(B,)`` at position ``pos``; returns its logits ``(B, V)``."""
        return self._forward(tokens[:, None], pos)

    def _check_end(self, end: int) -> None:
        if end > self.P:
            raise ValueError(f"position {end - 1} is beyond the cache's {self.P} positions")


class ModelDecoder(KVDecoder):
    """The model's own forward over a transformers ``DynamicCache``: whatever its modules, hooks or
    adapters compute, at the cost of a concatenating cache and a full module dispatch per step.
    ``step`` must continue where the cache ends (``pos`` = tokens fed so far), as ``generate`` does."""

    fast = False

    def _build(self, model: nn.Module, cfg: modeling.GPTConfig, classes: torch.Tensor | None) -> None:
        self.model, self.classes = model, classes
        self.fallback_reason = unknown_part(model)
        # The head on the last position only, where the model's forward takes transformers' argument.
        forward_params = inspect.signature(model.forward).parameters
        self.head_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in forward_params else {}
        self.cache: DynamicCache | None = None

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.cache = DynamicCache()
        return super().prefill(input_ids)

    def _forward(self, idx: torch.Tensor, pos: int) -> torch.Tensor:
        if self.cache is None:
            raise ValueError("step() before prefill(): prefill first")
        self._check_end(pos + idx.shape[1])
        filled = self.cache.get_seq_length()
        if pos != filled:
            raise ValueError(f"pos={pos}, but the model's cache holds {filled} positions: step at pos={filled}")
        modes = [(m, m.training) for m in self.model.modules()]
        try:  # in eval mode (no dropout, no class dropout), every module's own mode restored after
            out = self.model.eval()(idx, classes=self.classes, cache=self.cache, use_cache=True, **self.head_kwargs)
        finally:
            for m, training in modes:
                m.training = training
        return out.logits[:, -1].to(self.device)


def _row_blocks(linear: nn.Linear, splits: int, pad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``linear``'s weight ``(out, in)`` and bias as ``(P, out / P, in)`` and ``(P, out / P, 1)`` views
    (no bias: ``None``), ``P = splits`` row blocks. Where ``out`` does not divide evenly: one block, or
    with ``pad`` zero rows appended (a copy) whose outputs the caller drops."""
    w, b = linear.weight, linear.bias
    if w.shape[0] % splits:
        if pad:
            extra = -w.shape[0] % splits
            w = torch.cat([w, w.new_zeros(extra, w.shape[1])])
            b = None if b is None else torch.cat([b, b.new_zeros(extra)])
        else:
            splits = 1
    rows = w.shape[0] // splits
    return w.view(splits, rows, -1), None if b is None else b.view(splits, rows, 1)


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


def _layer_norm(ln: nn.LayerNorm) -> tuple:
    """``F.layer_norm``'s arguments after the input."""
    return ln.normalized_shape, ln.weight, ln.bias, ln.eps


class FastDecoder(KVDecoder):
    """The model's modules driven over a KV cache preallocated for the whole image: ``GPT.forward`` in
    eval mode, each op with its module's weights and settings, for models it knows (``unknown_part``;
    any other raises ``NotImplementedError``).

    The cache is one tensor ``(L, 2, B, nh, P, hs)`` (layers, key/value, batch, heads, positions, head
    size) with ``P = length``. ``prefill`` writes the prompt's keys and values at positions
    ``0 .. T-1``; ``step`` writes one position and attends over the filled prefix only.
    """

    fast = True

    def _build(self, model: nn.Module, cfg: modeling.GPTConfig, classes: torch.Tensor | None) -> None:
        if (reason := unknown_part(model)) is not None:
            raise NotImplementedError(f"the fast decoder cannot drive this model: {reason}; KVDecoder(...) "
                                      "falls back to the model's own forward")
        # Split each weight's rows into one block per CPU thread: a batched matmul runs the blocks
        # on all cores, where a single matmul with a handful of rows (a matrix-vector product at
        # batch 1) keeps to one. Accelerators parallelise inside one matmul already.
        splits = torch.get_num_threads() if self.device.type == "cpu" else 1
        weights = []
        for block in model.h:
            attn, mlp = block.attn, block.mlp
            # One flat tuple per layer (views of the parameters, no copies): a decode step is short
            # enough that module attribute lookups show up next to the matmuls.
            weights.append((
                _layer_norm(block.ln_1), *_row_blocks(attn.qkv, splits), *_row_blocks(attn.proj, splits),
                _layer_norm(block.ln_2), *_row_blocks(mlp.fc, splits), mlp.act.approximate,
                *_row_blocks(mlp.proj, splits),
            ))
        self.dtype = model.wte.weight.dtype
        self.C, self.nh = cfg.embed_dim, cfg.num_heads
        self.hs = self.C // self.nh
        self.wte, self.wpe = model.wte.weight, model.wpe.weight
        self.ln_f = _layer_norm(model.ln_f)
        # The head in row blocks too. Its row count (codes + specials) is rarely a multiple of the
        # threads: pad with zero rows (a copy of at most a few MB) and drop their logits.
        self.V = model.lm_head.weight.shape[0]
        self.head = _row_blocks(model.lm_head, splits, pad=True)
        # (L, 2, B, nh, P, hs): a layer's keys for one head are contiguous, so attending over the
        # filled prefix streams one block of memory per head.
        self.cache = torch.empty(len(weights), 2, self.B, self.nh, self.P, self.hs, device=self.device,
                                 dtype=self.dtype)
        # The class vector is the same at every position: look it up once, from the table itself,
        # so that no class dropout applies whatever the model's mode. (B, 1, C)
        self.cls = None if model.cls_emb is None else F.embedding(classes, model.cls_emb.weight)[:, None, :]
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

    def _forward(self, idx: torch.Tensor, pos: int) -> torch.Tensor:
        B, T = idx.shape
        C, nh, hs = self.C, self.nh, self.hs
        S = pos + T  # keys filled once this call has written its own
        self._check_end(S)
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
        for kv, k, v, ln1, wqkv, bqkv, wo, bo, ln2, wfc, bfc, act, wp, bp in self.layers:
            h = F.layer_norm(x, *ln1)
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
            h = F.layer_norm(x, *ln2)
            # Row-major (in, rows) operands take a matmul path 2-7x slower than column-major ones
            # (the layout h.t() has): transpose the fc output into (rows, mlp) before the GELU.
            u = F.gelu(_linear_t(wfc, bfc, h.t()).t().contiguous(), approximate=act)  # (rows, mlp)
            x += _linear_t(wp, bp, u.t()).t()
        x = F.layer_norm(x.view(B, T, C)[:, -1], *self.ln_f)  # only the last position is sampled
        logits = _linear_t(*self.head, x.t())  # (V', B), V' >= V: the padded rows last
        return logits[: self.V].t().contiguous()  # (B, V)
