"""GPT prior over discrete image codes, as a transformers model.

Read top to bottom: attention (one eager reference and one SDPA path), MLP, block, then the model.
This file ships as Hugging Face remote code next to ``configuration_codegpt.py``, so it imports only
torch, transformers, the standard library and that file (relatively).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_codegpt import GPTConfig

# transformers 5.24 renamed the output field (and forward kwarg) `past_key_values` to `cache`;
# name the field after the installed version so generate() finds the cache either way.
_CACHE_FIELD = (
    "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
)


@dataclass
class GPTOutput(CausalLMOutputWithPast):
    """A ``CausalLMOutputWithPast`` that also unpacks as ``logits, loss``.

    ``out.loss``, ``out.logits``, ``out["loss"]``, ``out[0]`` and ``dict(out)`` behave as for any
    transformers output; only iteration is changed, so that ``logits, loss = model(...)`` works.
    """

    def __iter__(self):
        return iter((self.logits, self.loss))

    if _CACHE_FIELD == "past_key_values":

        @property
        def cache(self):
            """The KV cache under its 5.24 name, so ``out.cache`` works on older transformers too."""
            return self.past_key_values


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


def eager_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    dropout: float,
    causal_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The readable reference. q (B, nh, T, hs), k/v (B, nh, S, hs); returns (B, nh, T, hs) and the
    attention weights (B, nh, T, S)."""
    T, S = q.shape[-2], k.shape[-2]
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, nh, T, S)
    if mask is None and is_causal:
        # Query i sits at absolute position S - T + i and sees keys 0 .. S - T + i.
        mask = causal_mask[S - T : S, :S]
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    att = F.softmax(att, dim=-1)
    if dropout > 0.0:
        att = F.dropout(att, p=dropout, training=True)
    return att @ v, att


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    dropout: float,
    causal_mask: torch.Tensor,
) -> tuple[torch.Tensor, None]:
    """PyTorch's fused attention. Its ``is_causal`` aligns the mask top-left, which is right only
    when queries and keys start together (no past); after a past, several queries need an explicit
    mask and a single query needs none (it sees every key)."""
    T, S = q.shape[-2], k.shape[-2]
    if mask is None and is_causal and T > 1 and T != S:
        mask = causal_mask[S - T : S, :S]
    use_is_causal = mask is None and is_causal and T > 1
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=use_is_causal)
    return y, None


ATTENTION_FUNCTIONS = {"eager": eager_attention, "sdpa": sdpa_attention}


class _LinearReducedPrecisionCPU(torch.autograd.Function):
    """``F.linear`` whose backward keeps both GEMM operands contiguous along the summed dimension.

    CPUs without native bf16/fp16 instructions (no AVX512-BF16/AMX: most AMD and pre-Sapphire-Rapids
    Intel parts) run reduced-precision GEMMs on a fallback kernel that is fast only when both
    operands are contiguous along the reduced dimension. ``F.linear``'s forward (x @ W^T) and its
    weight gradient (g^T @ x) already are; autograd's input gradient (g @ W, W row-major) is not,
    and costs ten times the others (2048x256x768 in bf16 on 2 AMD EPYC cores: 590 ms against
    50 ms). Transposing W once (a few hundred KB) turns it into another x @ W^T.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.linear(grad, weight.t().contiguous())  # g @ W as g @ (W^T)^T: (..., in)
        g2 = grad.reshape(-1, grad.shape[-1])  # (M, out)
        if ctx.needs_input_grad[1]:
            grad_w = g2.t() @ x.reshape(-1, x.shape[-1])  # (out, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b


def _reduced_precision_cpu(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a CPU linear computes in bf16/fp16 (autocast or low-precision weights)."""
    if x.device.type != "cpu":
        return False
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else weight.dtype
    return dtype in (torch.bfloat16, torch.float16)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) with a faster reduced-precision CPU backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and _reduced_precision_cpu(x, self.weight):
            return _LinearReducedPrecisionCPU.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose CPU mask comes from 32 random bits per element: each element is kept with
    probability 1 - p (p rounded to a multiple of 2^-32; ``torch.rand`` itself resolves only 2^-24)
    and scaled by 1 / (1 - p). One 64-bit draw yields two elements' bits, so the mask costs a quarter
    of ``bernoulli_`` and half of ``torch.rand``: the CPU generator is serial, and in a training
    step it was the most expensive kernel after the matmuls, attention and GELU. Elsewhere it is
    ``F.dropout``'s fused kernel. Seeded by torch's default generator, like ``F.dropout``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or self.p >= 1.0 or self.inplace:
            return F.dropout(x, self.p, True, self.inplace)
        n = x.numel()
        # from=int64 min with no upper bound: every one of the 64 bits uniform (the default stops at 2^63).
        bits = torch.empty((n + 1) // 2, dtype=torch.int64).random_(-(2**63), None).view(torch.int32)[:n]
        drop_below = round(self.p * 2**32) - 2**31  # P(bits < drop_below) = round(p * 2^32) / 2^32
        keep = (bits >= drop_below).view(x.shape)
        scale = torch.where(keep, x.new_full((), 1.0 / (1.0 - self.p)), 0.0)  # x's dtype
        return x * scale


class _TanhGELUCPU(torch.autograd.Function):
    """GPT-2's tanh GELU as x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3): the same function
    (0.5 (1 + tanh u) = sigmoid(2u)), but the CPU's vectorised tanh costs 3.5x its sigmoid, which
    made ``F.gelu(approximate="tanh")`` and its backward the largest non-matmul kernels of an fp32
    training step. The forward also computes the derivative while x is still in cache and saves
    only that (one activation-sized tensor, where ``F.gelu`` saves x), so the backward is one
    multiply. A training step at the seed shape on 2 cores: 2-3% faster than with ``F.gelu``."""

    K = 2.0 * math.sqrt(2.0 / math.pi)  # z = 2u = K (x + C x^3)
    C = 0.044715

    @staticmethod
    def gate(x: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z and sigmoid(z) from x and x^2 (two new tensors)."""
        z = torch.addcmul(x, x2, x, value=_TanhGELUCPU.C).mul_(_TanhGELUCPU.K)
        return z, torch.sigmoid(z)

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x2 = x * x
        z, s = _TanhGELUCPU.gate(x, x2)
        y = torch.mul(x, s, out=x2)
        # dy/dx = s + x s (1 - s) dz/dx, x dz/dx = K (x + 3 C x^3) = 3 (z - 2Kx/3): z's buffer becomes
        # s (1 - s) (z - 2Kx/3), then s + 3 times that. Each step is one pass over the activations.
        w = z.add_(x, alpha=-2.0 * _TanhGELUCPU.K / 3.0).mul_(s)
        w.addcmul_(w, s, value=-1.0)
        ctx.save_for_backward(torch.add(s, w, alpha=3.0, out=w))
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (dydx,) = ctx.saved_tensors
        return grad * dydx


class GELU(nn.GELU):
    """``nn.GELU``; the tanh approximation in fp32/fp64 on a CPU takes the sigmoid form above (the
    same function to rounding). Low-precision inputs and other devices use ``F.gelu``'s kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.approximate == "tanh" and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
            if torch.is_grad_enabled() and x.requires_grad:
                return _TanhGELUCPU.apply(x)
            return x * _TanhGELUCPU.gate(x, x * x)[1]
        return F.gelu(x, approximate=self.approximate)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.head_dim = config.embed_dim // config.num_heads
        self.qkv = Linear(config.embed_dim, 3 * config.embed_dim)  # fused: one matmul, not three
        self.proj = Linear(config.embed_dim, config.embed_dim)
        self.proj.is_residual_projection = True
        self.resid_dropout = Dropout(config.resid_dropout)

    def forward(
        self,
        x: torch.Tensor,
        causal_mask: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, C = x.shape
        # (B, T, 3C) -> three (B, nh, T, hs) views
        # Unbinding (B, T, 3, nh, hs) before the transpose lets the backward stack the three gradients
        # straight into the (B, T, 3C) layout the projection needs: one copy instead of two.
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).unbind(2))
        if cache is not None:
            # Three positional arguments: the signature that 4.x and 5.x share.
            k, v = cache.update(k, v, self.layer_idx)  # (B, nh, S, hs), S = past + T
        impl = "eager" if output_attentions else self.config._attn_implementation
        attend = ATTENTION_FUNCTIONS.get(impl, sdpa_attention)
        dropout = self.config.attn_dropout if self.training else 0.0
        y, weights = attend(q, k, v, attention_mask, True, dropout, causal_mask)
        y = y.transpose(1, 2).reshape(B, T, C)  # re-assemble heads side by side
        return self.resid_dropout(self.proj(y)), weights


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = Linear(config.embed_dim, config.mlp_dim)
        # GPT-2's tanh GELU: torch's fused kernel, or on a CPU in fp32 the cheaper sigmoid form (see
        # GELU), where transformers runs a seven-op Python one.
        self.act = GELU(approximate="tanh")
        self.proj = Linear(config.mlp_dim, config.embed_dim)
        self.proj.is_residual_projection = True
        self.dropout = Dropout(config.resid_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.act(self.fc(x))))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        causal_mask: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        a, weights = self.attn(self.ln_1(x), causal_mask, attention_mask, cache, output_attentions)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, weights


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class GPTPreTrainedModel(PreTrainedModel):
    config_class = GPTConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TransformerBlock"]
    _supports_sdpa = True
    _supports_cache_class = True
    # Trainer would otherwise skip its division by gradient-accumulation steps (forward has
    # **kwargs) and log the sum of micro-batch losses.
    accepts_loss_kwargs = False

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        # transformers guesses this from the source text (it looks for its AttentionInterface); our
        # attention reads config._attn_implementation at every call, so switching is always safe.
        return True

    def _init_weights(self, module: nn.Module) -> None:
        # torch.nn.init (not .data.normal_()): transformers guards these during from_pretrained, so
        # loaded weights are never overwritten.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "is_residual_projection", False):
                # GPT-2: each block adds two residual branches, so scale them down with depth.
                std = std / math.sqrt(2 * self.config.num_layers)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, GPT):
            # A non-persistent buffer is not in the checkpoint: on the meta device it would come back
            # as uninitialised memory, so rebuild it here.
            with torch.no_grad():
                module.causal_mask.copy_(torch.ones_like(module.causal_mask).tril())


class GPT(GPTPreTrainedModel, GenerationMixin):
    r"""A GPT-style autoregressive prior over the discrete codes of an image.

    Sequence layout: ``[start, c_1, ..., c_N]`` with ``N = config.seq_len``. Token embedding + learned
    position embedding (+ class embedding on every position for a class-conditional model) feed
    ``num_layers`` pre-norm blocks, a final LayerNorm and a linear head over ``vocab_size``.

    ``logits, loss = model(input_ids, labels=labels, classes=classes)`` works, and so do
    ``out.logits``, ``out.loss``, transformers' ``Trainer`` and ``model.generate``.
    """

    _tied_weights_keys = {"lm_head.weight": "wte.weight"}

    def __init__(self, config: GPTConfig) -> None:
        super().__init__(config)
        P = config.max_position_embeddings
        self.wte = nn.Embedding(config.vocab_size, config.embed_dim)
        self.wpe = nn.Embedding(P, config.embed_dim)
        # Row num_classes is the null class: no condition, used when classes is None and for guidance.
        self.cls_emb = (
            nn.Embedding(config.num_classes + 1, config.embed_dim) if config.class_conditional else None
        )
        self.drop = Dropout(config.embd_dropout)
        self.h = nn.ModuleList(TransformerBlock(config, i) for i in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.lm_head = Linear(config.embed_dim, config.vocab_size, bias=False)
        # One lower-triangular mask, sliced for any length and any cache offset.
        self.register_buffer("causal_mask", torch.ones(P, P, dtype=torch.bool).tril(), persistent=False)
        self.gradient_checkpointing = False
        self.post_init()
        self._set_generation_defaults()

    def _set_generation_defaults(self) -> None:
        gc = self.generation_config
        if gc is None:
            return
        cfg = self.config
        # Special ids are inputs only: generate() must never sample them.
        gc.suppress_tokens = list(range(cfg.codebook_size, cfg.vocab_size))
        gc.bos_token_id = cfg.start_token_id
        # Fill exactly one image after the start token (or after a given prefix).
        gc.max_length = cfg.max_position_embeddings

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``PreTrainedModel.save_pretrained``, with ``auto_map`` naming this class for ``AutoModel``
        and ``AutoModelForCausalLM`` (``register_for_auto_class`` records only one of them)."""
        if self._auto_class is not None:
            name = f"{type(self).__module__.rsplit('.', 1)[-1]}.{type(self).__name__}"
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            for auto_class in ("AutoModel", "AutoModelForCausalLM"):
                auto_map.setdefault(auto_class, name)
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @property
    def null_class(self) -> int:
        """Index of the null class embedding row (``num_classes``)."""
        return self.config.num_classes

    def _check_inputs(
        self,
        input_ids: torch.Tensor,
        classes: torch.Tensor | None,
        labels: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        past_length: int,
    ) -> None:
        cfg = self.config
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype.is_floating_point or input_ids.dtype in (torch.bool, torch.complex64):
            raise TypeError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(
                f"input_ids must have shape (batch, length) with length >= 1, got {tuple(input_ids.shape)}"
            )
        B, T = input_ids.shape
        P = cfg.max_position_embeddings
        if past_length + T > P:
            raise ValueError(
                f"input_ids is too long: {T} tokens after a cache of {past_length} is "
                f"{past_length + T} positions, but the model holds seq_len + 1 = {P} "
                "(the start token plus one image)"
            )
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= cfg.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"input_ids must be in [0, {cfg.vocab_size}) (vocab_size), got {bad}")
        if classes is not None:
            if not cfg.class_conditional:
                raise ValueError(
                    "classes was given to an unconditional model (config.class_conditional=False); "
                    "pass classes=None"
                )
            if not isinstance(classes, torch.Tensor):
                raise TypeError(f"classes must be a torch.Tensor of shape ({B},), got {type(classes).__name__}")
            if classes.dtype.is_floating_point or classes.dtype == torch.bool:
                raise TypeError(f"classes must be an integer tensor, got dtype {classes.dtype}")
            if classes.shape != (B,):
                raise ValueError(
                    f"classes must have shape ({B},) (one per row of input_ids), got {tuple(classes.shape)}"
                )
            clo, chi = int(classes.min()), int(classes.max())
            if clo < 0 or chi > cfg.num_classes:
                raise ValueError(
                    f"classes must be in [0, {cfg.num_classes}) (num_classes), or {cfg.num_classes} for "
                    f"the null class, got {clo if clo < 0 else chi}"
                )
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point:
                raise TypeError("labels must be an integer torch.Tensor shaped like input_ids")
            if labels.shape != input_ids.shape:
                raise ValueError(
                    f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}"
                )
            counted = labels[labels != -100]
            if counted.numel() and (int(counted.min()) < 0 or int(counted.max()) >= cfg.vocab_size):
                raise ValueError(f"labels must be -100 or in [0, {cfg.vocab_size}) (vocab_size)")
        if attention_mask is not None and attention_mask.shape != (B, past_length + T):
            raise ValueError(
                f"attention_mask must have shape (batch, past + length) = ({B}, {past_length + T}), "
                f"got {tuple(attention_mask.shape)}"
            )
        if position_ids is not None:
            if position_ids.shape not in ((B, T), (1, T)):
                raise ValueError(f"position_ids must have shape ({B}, {T}), got {tuple(position_ids.shape)}")
            if int(position_ids.min()) < 0 or int(position_ids.max()) >= P:
                raise ValueError(f"position_ids must be in [0, {P}) (seq_len + 1)")

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        classes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> GPTOutput:
        r"""
        Args:
            input_ids: (B, T) token ids, ``T <= seq_len + 1 - past``.
            labels: (B, T) targets aligned with ``input_ids`` (shifted inside); ``-100`` is ignored.
                The loss is the mean cross-entropy over the counted targets.
            classes: (B,) class ids in ``[0, num_classes]`` (``num_classes`` is the null class);
                ``None`` on a class-conditional model means the null class.
            attention_mask: (B, past + T), 1 for real tokens and 0 for padding.
            position_ids: (B, T) positions; by default ``past + arange(T)``.
            cache / past_key_values: a transformers ``Cache`` (``cache`` is the 5.24 name; both work).
        """
        # cache_position and friends from older generate() versions land in kwargs and are unused.
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        output_attentions = bool(output_attentions)
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        if input_ids is None:
            raise ValueError("input_ids is required (start with the start token, id config.start_token_id)")
        if self.gradient_checkpointing and self.training and use_cache:
            use_cache = False  # recomputation in backward would write the cache twice
        if use_cache and cache is None:
            cache = DynamicCache()
        past_length = cache.get_seq_length() if cache is not None else 0
        self._check_inputs(input_ids, classes, labels, attention_mask, position_ids, past_length)

        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + T, device=input_ids.device)[None]
        x = self.wte(input_ids) + self.wpe(position_ids)  # (B, T, C)
        if self.cls_emb is not None:
            if classes is None:
                classes = torch.full((B,), self.null_class, dtype=torch.long, device=input_ids.device)
            elif self.training and self.config.class_dropout_prob > 0:
                drop = torch.rand(B, device=classes.device) < self.config.class_dropout_prob
                classes = torch.where(drop, self.null_class, classes)
            x = x + self.cls_emb(classes)[:, None, :]  # the same class vector on every position
        x = self.drop(x)

        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            S = past_length + T
            # (B, 1, T, S): causal and not padding; a query always sees itself, so a padded row
            # never has every key masked (that would give NaN and spread it to later layers).
            pos = torch.arange(S, device=x.device)
            itself = pos[None, :] == pos[S - T :, None]  # (T, S)
            keep = attention_mask.bool()[:, None, None, :] | itself
            mask = self.causal_mask[S - T : S, :S] & keep

        all_hidden = () if output_hidden_states else None
        all_attn = () if output_attentions else None
        for block in self.h:
            if output_hidden_states:
                all_hidden += (x,)
            if self.gradient_checkpointing and self.training:
                x, w = self._gradient_checkpointing_func(
                    block.__call__, x, self.causal_mask, mask, None, output_attentions
                )
            else:
                x, w = block(x, self.causal_mask, mask, cache, output_attentions)
            if output_attentions:
                all_attn += (w,)
        x = self.ln_f(x)
        if output_hidden_states:
            all_hidden += (x,)
        logits = self.lm_head(x)  # (B, T, vocab)

        loss = None
        if labels is not None:
            # Shift the labels, not the logits: no copy of the (B, T, vocab) tensor.
            targets = F.pad(labels[:, 1:], (0, 1), value=-100)
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100)

        return GPTOutput(
            loss=loss,
            logits=logits,
            hidden_states=all_hidden,
            attentions=all_attn,
            **{_CACHE_FIELD: cache if use_cache else None},
        )
