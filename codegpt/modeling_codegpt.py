"""GPT prior over discrete image codes, as a transformers model: the output, eager attention, the class
embedding, attention, MLP, block, then the model. Hub remote code: it imports only torch, transformers,
the standard library and ``configuration_codegpt`` (``codegpt.fast``'s CPU kernels are swapped in from outside)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_codegpt import GPTConfig

# transformers 5.24 renamed the output field (and forward kwarg) `past_key_values` to `cache`: use the installed one.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass
class GPTOutput(CausalLMOutputWithPast):
    """A ``CausalLMOutputWithPast`` (``out.loss``, ``out[0]``, ``to_tuple()``) that unpacks as ``logits, loss``."""

    def __iter__(self):
        return iter((self.logits, self.loss))

    if _CACHE_FIELD == "past_key_values":  # the KV cache under its 5.24 name on older transformers too
        cache = property(lambda self: self.past_key_values)


def eager_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The readable reference, with transformers' attention-function signature. q (B, nh, T, hs), k/v (B, nh,
    S, hs), mask None (causal, S == T) or bool (B|1, 1, T, S), True = attend. Returns (B, T, nh, hs), (B, nh, T, S)."""
    T, S = query.shape[-2], key.shape[-2]
    if attention_mask is None:
        attention_mask = torch.ones(T, S, dtype=torch.bool, device=query.device).tril()
    scaling = 1.0 / math.sqrt(query.shape[-1]) if scaling is None else scaling
    att = (query @ key.transpose(-2, -1)) * scaling  # (B, nh, T, S)
    att = F.softmax(att.masked_fill(~attention_mask, float("-inf")), dim=-1)
    att = F.dropout(att, p=dropout, training=dropout > 0.0)
    return (att @ value).transpose(1, 2), att


def causal_mask(query_slots: torch.Tensor, num_keys: int, padding: torch.Tensor | None) -> torch.Tensor:
    """(B|1, 1, T, S) bool mask: query t sees cache slots up to its own, ``query_slots[t]``, except padding
    (``padding`` (B, L), 1 = real). A query always sees itself: a fully masked padded row would spread NaN."""
    keys = torch.arange(num_keys, device=query_slots.device)
    mask = keys <= query_slots[:, None]  # (T, S)
    if padding is None:
        return mask[None, None]
    # A static cache holds more slots than the mask has tokens; the extra ones are causally masked.
    real = F.pad(padding.bool(), (0, num_keys - padding.shape[-1]))[:, None, None, :]  # (B, 1, 1, S)
    return mask & (real | (keys == query_slots[:, None]))


class ClassEmbedding(nn.Embedding):
    """One learned vector per class, plus the null class (row ``num_classes``, "no condition") for classifier-free
    guidance. ``cls_emb(classes, B)`` is (B, C): the null class for ``classes=None``; in training each class becomes
    the null class with probability ``class_dropout_prob``: one model learns both distributions."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__(config.num_classes + 1, config.embed_dim)
        self.null_class = config.num_classes
        self.dropout_prob = config.class_dropout_prob

    def forward(self, classes: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        if classes is None:
            classes = torch.full((batch_size,), self.null_class, dtype=torch.long, device=self.weight.device)
        elif self.training and self.dropout_prob > 0:
            drop = torch.rand(classes.shape, device=classes.device) < self.dropout_prob
            classes = torch.where(drop, self.null_class, classes)
        return super().forward(classes)


class CausalSelfAttention(nn.Module):
    is_causal = True  # read by transformers' attention functions when no mask is given

    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.head_dim = config.embed_dim // config.num_heads
        self.scaling = self.head_dim**-0.5
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim)  # fused: one matmul, not three
        self.proj = nn.Linear(config.embed_dim, config.embed_dim)
        self.proj.is_residual_projection = True
        self.resid_dropout = nn.Dropout(config.resid_dropout)

    def forward(
        self, x: torch.Tensor, query_slots: torch.Tensor, padding: torch.Tensor | None = None,
        cache: Cache | None = None, output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, C = x.shape
        # (B, T, 3C) -> three (B, nh, T, hs) views. Unbinding before the transpose lets the backward stack
        # the three gradients straight into the (B, T, 3C) layout the projection needs: one copy, not two.
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).unbind(2))
        if cache is not None:
            # The slots travel as 4.x's cache_kwargs (a static cache writes there); 5.x ignores them.
            k, v = cache.update(k, v, self.layer_idx, {"cache_position": query_slots})  # (B, nh, S, hs)
        # No mask only when the keys are exactly these T tokens, unpadded (the fused kernels' causal path):
        # a past, a static cache's empty slots or padding need one (SDPA's is_causal is top-left aligned).
        S = k.shape[-2]
        mask = None if padding is None and S == T else causal_mask(query_slots, S, padding)
        impl = "eager" if output_attentions else self.config._attn_implementation
        attend = eager_attention_forward if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]
        dropout = self.config.attn_dropout if self.training else 0.0
        y, weights = attend(self, q, k, v, mask, dropout=dropout, scaling=self.scaling)
        y = y.reshape(B, T, C)  # (B, T, nh, hs): heads side by side
        return self.resid_dropout(self.proj(y)), weights


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.embed_dim, config.mlp_dim)
        self.act = nn.GELU(approximate="tanh")  # GPT-2's
        self.proj = nn.Linear(config.mlp_dim, config.embed_dim)
        self.proj.is_residual_projection = True
        self.dropout = nn.Dropout(config.resid_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.act(self.fc(x))))


class TransformerBlock(GradientCheckpointingLayer):
    """Pre-norm block: x + attn(ln(x)), then x + mlp(ln(x)); recomputed in backward under checkpointing
    (a ``GradientCheckpointingLayer``: x must stay positional)."""

    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, query_slots: torch.Tensor, padding: torch.Tensor | None = None,
        cache: Cache | None = None, output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        a, weights = self.attn(self.ln_1(x), query_slots, padding, cache, output_attentions)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, weights


class GPTPreTrainedModel(PreTrainedModel):
    config_class = GPTConfig
    base_model_prefix = ""  # a single-class model: model.base_model is the model itself
    supports_gradient_checkpointing = True
    _no_split_modules = ["TransformerBlock"]
    _supports_sdpa = True
    _can_compile_fullgraph = True  # no data-dependent branch in forward while compiling (see _checks_values)
    accepts_loss_kwargs = False  # else Trainer, seeing **kwargs, logs the sum of micro-batch losses

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        return True  # transformers guesses from the source; our attention looks it up at every call

    def _init_weights(self, module: nn.Module) -> None:
        # torch.nn.init (not .data.normal_()), which from_pretrained guards: loaded weights stay.
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            if getattr(module, "is_residual_projection", False):
                # GPT-2: each block adds two residual branches, so scale them down with depth.
                std = std / math.sqrt(2 * self.config.num_layers)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class GPT(GPTPreTrainedModel, GenerationMixin):
    r"""A GPT-style autoregressive prior over the codes of an image, ``[start, c_1, ..., c_N]`` with
    ``N = config.seq_len``: token + learned position (+ class, on every position) embeddings feed
    ``num_layers`` pre-norm blocks, a final LayerNorm and a linear head over ``vocab_size``.
    ``logits, loss = model(input_ids, labels=labels, classes=classes)`` works, and so do ``out.logits``,
    ``out.loss``, ``Trainer`` and ``model.generate`` (every strategy, any cache, ``classes=`` passed on).

    Bad ids, classes, labels and positions raise a ``ValueError`` naming the argument; values are read only
    on CPU tensors and never while compiling (no host sync), unless ``model.check_input_values`` is True
    (everywhere, one sync per forward) or False (never: ``codegpt.generate`` and the data loader check theirs).
    """

    _tied_weights_keys = {"lm_head.weight": "wte.weight"}
    _input_embed_layer = "wte"  # for get/set_input_embeddings; the output one is lm_head
    check_input_values: bool | None = None  # None: CPU tensors only

    def __init__(self, config: GPTConfig) -> None:
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.embed_dim)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.embed_dim)
        self.cls_emb = ClassEmbedding(config) if config.class_conditional else None
        self.drop = nn.Dropout(config.embd_dropout)
        self.h = nn.ModuleList(TransformerBlock(config, i) for i in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.embed_dim, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.post_init()
        # generate() samples one image, never a special id. A fresh config: 4.x re-derives a model-derived one.
        self.generation_config = GenerationConfig(
            do_sample=True, top_k=min(100, config.codebook_size), max_length=config.max_position_embeddings,
            bos_token_id=config.start_token_id, suppress_tokens=list(range(config.codebook_size, config.vocab_size)))

    def save_pretrained(self, save_directory, *args, **kwargs):
        """With ``auto_map`` naming this class for AutoModel and AutoModelForCausalLM (register_for_auto_class: one)."""
        if self._auto_class is not None:
            name = f"{type(self).__module__.rsplit('.', 1)[-1]}.{type(self).__name__}"
            ours = {"AutoModel": name, "AutoModelForCausalLM": name}
            self.config.auto_map = {**ours, **(getattr(self.config, "auto_map", None) or {})}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def resize_token_embeddings(self, new_num_tokens: int | None = None, *args, **kwargs) -> nn.Embedding:
        """Keeps every code and the start token; new ids are special: never sampled (suppress_tokens)."""
        if new_num_tokens is not None and not self.config.start_token_id < new_num_tokens:
            raise ValueError(f"new_num_tokens must be > start_token_id = {self.config.start_token_id} (the codes and "
                             f"the start token stay), got {new_num_tokens}")
        embeddings = super().resize_token_embeddings(new_num_tokens, *args, **kwargs)
        self.generation_config.suppress_tokens = list(range(self.config.codebook_size, self.config.vocab_size))
        return embeddings

    def _validate_generated_length(self, generation_config, input_ids_length: int, *args, **kwargs):
        # Refuse a length beyond one image before the first step (one too many would draw a code past the image).
        P, T = self.config.max_position_embeddings, input_ids_length
        if generation_config.max_length > P:
            raise ValueError(f"max_new_tokens must be at most {P - T} and max_length at most {P} (seq_len + 1; the "
                             f"prompt has {T}), got max_length {generation_config.max_length}: beyond one image")
        return super()._validate_generated_length(generation_config, input_ids_length, *args, **kwargs)

    null_class = property(lambda self: self.config.num_classes)  # the row of the null class embedding

    def create_masks_for_generate(self, *args, attention_mask: torch.Tensor | None = None, **kwargs):
        return attention_mask  # generate() asks for a 4-D mask for static caches; forward builds its own

    def _checks_values(self, t: torch.Tensor) -> bool:  # whether forward reads t's values (see the class docstring)
        if torch.compiler.is_compiling():
            return False
        return t.device.type == "cpu" if self.check_input_values is None else self.check_input_values

    def _check_ids(self, name: str, t: object, shape: tuple, high: int, ignore: int | None = None) -> None:
        """An integer tensor of ``shape`` with values in ``[0, high)`` (or ``ignore``)."""
        if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name} must be an integer torch.Tensor of shape {shape}, got {got}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        if self._checks_values(t):
            counted = t if ignore is None else t[t != ignore]
            lo, hi = (int(counted.min()), int(counted.max())) if counted.numel() else (0, 0)
            if lo < 0 or hi >= high:
                allowed = f"[0, {high})" + ("" if ignore is None else f" or {ignore}")
                raise ValueError(f"{name} must be in {allowed}, got {lo if lo < 0 else hi}")

    def _check_inputs(self, input_ids, inputs_embeds, classes, labels, shift_labels, attention_mask, position_ids,
                      past) -> None:
        cfg, P = self.config, self.config.max_position_embeddings
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds (start with config.start_token_id)")
        name, x = ("input_ids", input_ids) if inputs_embeds is None else ("inputs_embeds", inputs_embeds)
        dims = (2,) if inputs_embeds is None else (3, cfg.embed_dim)
        if not isinstance(x, torch.Tensor) or (x.dim(), *x.shape[2:]) != dims or x.shape[1] == 0:
            layout = "(batch, length)" if inputs_embeds is None else f"(batch, length, {cfg.embed_dim})"
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a tensor of shape {layout} with length >= 1, got {got}")
        B, T = x.shape[:2]
        # A static cache counts its tokens in a tensor: read it only where that costs no sync.
        past = int(past) if isinstance(past, int) or self._checks_values(past) else None
        if past is not None and past + T > P:
            raise ValueError(f"{name} is too long: {T} tokens after a cache of {past} is {past + T} positions, "
                             f"but the model holds seq_len + 1 = {P} (the start token plus one image)")
        if classes is not None and not cfg.class_conditional:
            raise ValueError("classes was given to an unconditional model (config.class_conditional=False)")
        rows = 1 if getattr(position_ids, "shape", ())[:1] == (1,) else B  # one row of positions may serve all
        for args in (
            ("input_ids", input_ids, (B, T), cfg.vocab_size),
            ("classes", classes, (B,), cfg.num_classes + 1),  # num_classes is the null class
            ("labels", labels, (B, T), cfg.vocab_size, -100),
            ("shift_labels", shift_labels, (B, T), cfg.vocab_size, -100),
            ("position_ids", position_ids, (rows, T), P),
        ):
            if args[1] is not None:
                self._check_ids(*args)
        if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.shape[0] != B
                                           or (past is not None and attention_mask.shape[1] != past + T)):
            raise ValueError(f"attention_mask must have shape (batch, past + length) = ({B}, {past} + {T}), "
                             f"got {tuple(attention_mask.shape)}")

    def forward(
        self, input_ids: torch.LongTensor | None = None, labels: torch.LongTensor | None = None,
        classes: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
        past_key_values: Cache | None = None, inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None, output_attentions: bool | None = None,
        output_hidden_states: bool | None = None, return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0, shift_labels: torch.LongTensor | None = None, **kwargs,
    ) -> GPTOutput | tuple:
        r"""
        Args:
            input_ids: (B, T) token ids, ``T <= seq_len + 1 - past``; or ``inputs_embeds`` (B, T, C).
            labels: (B, T) targets aligned with ``input_ids`` (shifted inside; ``-100`` is ignored): the loss
                is their mean cross-entropy (their sum over ``num_items_in_batch`` when Trainer passes it).
            classes: (B,) class ids in ``[0, num_classes]`` (``num_classes``, or None: the null class).
            attention_mask: (B, past + T), 1 for real tokens and 0 for padding.
            cache / past_key_values: any ``Cache`` (the old name warns where transformers renamed it).
            position_ids (default: the cache slots), logits_to_keep (0: all), shift_labels, cache_position (4.x's
                generate), use_cache, output_attentions, output_hidden_states, return_dict: as in transformers.

        Returns a :class:`GPTOutput`, or with ``return_dict=False`` its ``to_tuple()``: the fields that are
        not None among (loss, logits, cache, hidden_states, attentions), in that order.
        """
        # Besides its keywords: what generate() (4.57: cache_position) and Trainer pass. Else a TypeError.
        if unknown := sorted(set(kwargs) - {"cache_position", "num_items_in_batch"}):
            raise TypeError(f"GPT.forward() got unexpected keyword arguments {unknown}")
        cfg = self.config
        cache = cache if cache is not None else past_key_values
        use_cache = cfg.use_cache if use_cache is None else use_cache
        output_attentions = cfg.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = cfg.return_dict if return_dict is None else return_dict
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            use_cache, cache = False, None  # recomputation in backward would write the cache twice
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0  # a tensor for static caches
        self._check_inputs(input_ids, inputs_embeds, classes, labels, shift_labels, attention_mask, position_ids, past)

        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T = x.shape[:2]
        query_slots = kwargs.get("cache_position")  # (T,) where the new tokens sit in the cache
        if query_slots is None:
            query_slots = torch.arange(T, device=x.device) + past
        x = x + self.wpe(query_slots[None] if position_ids is None else position_ids)
        if self.cls_emb is not None:
            x = x + self.cls_emb(classes, B)[:, None, :]  # the same class vector on every position
        x = self.drop(x)

        padding = attention_mask
        if padding is not None and self._checks_values(padding) and bool(padding.all()):
            padding = None  # nothing to mask: keep the fused kernels' causal path

        all_hidden = () if output_hidden_states else None
        all_attn = () if output_attentions else None
        for block in self.h:
            if output_hidden_states:
                all_hidden += (x,)
            x, weights = block(x, query_slots, padding, cache=cache, output_attentions=output_attentions)
            if output_attentions:
                all_attn += (weights,)
        x = self.ln_f(x)
        if output_hidden_states:
            all_hidden += (x,)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(x[:, keep])  # (B, T or kept, vocab)

        loss = None
        if labels is not None or shift_labels is not None:
            # Shift the labels, not the logits: no copy of the (B, T, vocab) tensor.
            targets = shift_labels if shift_labels is not None else F.pad(labels[:, 1:], (0, 1), value=-100)
            targets = targets[:, keep].reshape(-1)
            # With Trainer's num_items_in_batch: the mean over every micro-batch of an accumulated step.
            n_items = kwargs.get("num_items_in_batch")
            flat = logits.view(-1, logits.shape[-1]).float()
            loss = F.cross_entropy(flat, targets, ignore_index=-100, reduction="mean" if n_items is None else "sum")
            loss = loss if n_items is None else loss / n_items

        cache = {_CACHE_FIELD: cache if use_cache else None}
        out = GPTOutput(loss=loss, logits=logits, hidden_states=all_hidden, attentions=all_attn, **cache)
        return out if return_dict else out.to_tuple()

    if _CACHE_FIELD == "cache":  # 5.24 renamed past_key_values: its own decorator maps the old name and warns
        forward = deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)
