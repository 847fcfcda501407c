"""Configuration of codegpt's GPT prior over discrete image codes.

This file ships as Hugging Face remote code next to ``modeling_codegpt.py``: it imports only the
standard library and transformers, so a saved model loads where codegpt is not installed.
"""

from __future__ import annotations

from transformers import PretrainedConfig


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    """Raise if ``value`` is not an int in ``[low, high]`` (``high`` None means unbounded)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < low or (high is not None and value > high):
        allowed = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {allowed}, got {value}")


class GPTConfig(PretrainedConfig):
    r"""Configuration of :class:`GPT`, an autoregressive prior over the codes of an image.

    An image of ``H x W`` codes becomes the sequence ``[start, c_1, ..., c_N]`` with ``N = seq_len =
    H * W``: the model holds ``seq_len + 1`` positions, every code is a training target and the start
    token never is.

    Args:
        vocab_size: Codebook size plus special tokens (at least the start token).
        seq_len: Codes per image (``H * W``); 1024 by default. ``max_position_embeddings`` (``seq_len + 1``)
            may be given instead.
        embed_dim: Width of the residual stream (``hidden_size``).
        num_layers: Transformer blocks (``num_hidden_layers``).
        num_heads: Attention heads (``num_attention_heads``); must divide ``embed_dim``.
        mlp_dim: Hidden width of each MLP; defaults to ``4 * embed_dim``.
        embd_dropout: Dropout on the summed embeddings.
        attn_dropout: Dropout on attention probabilities. Keep it at 0 unless you need it: any attention
            dropout takes PyTorch's fused CPU SDPA kernel off its fast path (slower, more memory).
        resid_dropout: Dropout on each block's attention and MLP outputs before the residual add.
        class_conditional: Whether a class embedding is added to every position.
        num_classes: Number of classes (``>= 1`` when ``class_conditional``). One more embedding row,
            index ``num_classes``, is the null class used for classifier-free guidance.
        class_dropout_prob: Probability, in training mode, of replacing a sample's class by the null
            class, so that one model learns both the conditional and the unconditional distribution.
        initializer_range: Standard deviation of the GPT-2 normal initialisation.
        layer_norm_eps: Epsilon of every LayerNorm.
        codebook_size: Number of real codes (ids ``0 .. codebook_size-1``); defaults to
            ``vocab_size - 1``. Ids from ``codebook_size`` up are special tokens and never sampled.
        start_token_id: Id of the start token; defaults to ``codebook_size``. Must be a special id.
        tie_word_embeddings: Share the token embedding with the output head.
        use_cache: Whether forward returns a KV cache by default.

    ``pad_token_id`` and ``eos_token_id`` are None: an image has a fixed length, no padding and no end
    token, and generate() fills exactly one image.
    """

    model_type = "codegpt"
    attribute_map = {
        "hidden_size": "embed_dim",
        "num_hidden_layers": "num_layers",
        "num_attention_heads": "num_heads",
        "intermediate_size": "mlp_dim",
    }

    def __init__(
        self,
        vocab_size: int = 1025,
        seq_len: int | None = None,
        embed_dim: int = 256,
        num_layers: int = 8,
        num_heads: int = 8,
        mlp_dim: int | None = None,
        embd_dropout: float = 0.1,
        attn_dropout: float = 0.0,
        resid_dropout: float = 0.1,
        class_conditional: bool = False,
        num_classes: int = 0,
        class_dropout_prob: float = 0.1,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-5,
        codebook_size: int | None = None,
        start_token_id: int | None = None,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        **kwargs,
    ) -> None:
        _check_int("vocab_size", vocab_size, 2)
        positions = kwargs.pop("max_position_embeddings", None)
        if positions is not None:
            _check_int("max_position_embeddings", positions, 2)
            if seq_len is not None and seq_len != positions - 1:
                raise ValueError(f"max_position_embeddings must be seq_len + 1 = {seq_len + 1} (the start token "
                                 f"plus one image), got {positions}")
            seq_len = positions - 1
        seq_len = 1024 if seq_len is None else seq_len
        _check_int("seq_len", seq_len, 1)
        _check_int("embed_dim", embed_dim, 1)
        _check_int("num_layers", num_layers, 1)
        _check_int("num_heads", num_heads, 1)
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim must be divisible by num_heads, got embed_dim={embed_dim} and "
                             f"num_heads={num_heads} (embed_dim % num_heads = {embed_dim % num_heads})")
        mlp_dim = 4 * embed_dim if mlp_dim is None else mlp_dim
        _check_int("mlp_dim", mlp_dim, 1)
        for name, p in (("embd_dropout", embd_dropout), ("attn_dropout", attn_dropout),
                        ("resid_dropout", resid_dropout), ("class_dropout_prob", class_dropout_prob)):
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be a float in [0, 1), got {p!r}")  # 1 would zero every activation
        if not isinstance(class_conditional, bool):
            raise ValueError(f"class_conditional must be a bool, got {class_conditional!r}")
        _check_int("num_classes", num_classes, 1 if class_conditional else 0)
        for name, value in (("initializer_range", initializer_range), ("layer_norm_eps", layer_norm_eps)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a float > 0, got {value!r}")
        codebook_size = vocab_size - 1 if codebook_size is None else codebook_size
        # At least one id above the codes is needed for the start token.
        _check_int("codebook_size", codebook_size, 1, vocab_size - 1)
        start_token_id = codebook_size if start_token_id is None else start_token_id
        _check_int("start_token_id", start_token_id, codebook_size, vocab_size - 1)

        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.embed_dim = embed_dim
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.embd_dropout = float(embd_dropout)
        self.attn_dropout = float(attn_dropout)
        self.resid_dropout = float(resid_dropout)
        self.class_conditional = class_conditional
        self.num_classes = num_classes
        self.class_dropout_prob = float(class_dropout_prob)
        self.initializer_range = float(initializer_range)
        self.layer_norm_eps = float(layer_norm_eps)
        self.codebook_size = codebook_size
        self.start_token_id = start_token_id
        self.use_cache = use_cache
        # generate() builds its (B, 1) start column from bos_token_id when no input_ids are given.
        kwargs.setdefault("bos_token_id", start_token_id)
        # transformers 5 no longer gives every config these; tools and generate's helpers read them.
        kwargs.setdefault("pad_token_id", None)
        kwargs.setdefault("eos_token_id", None)
        # v5 dropped tie_word_embeddings from the base config (absent means False, v4 meant True):
        # pass it explicitly so both majors agree.
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def max_position_embeddings(self) -> int:
        """Positions the model holds: the start token plus one image of ``seq_len`` codes. Setting it
        sets ``seq_len`` (to the value minus one)."""
        return self.seq_len + 1

    @max_position_embeddings.setter
    def max_position_embeddings(self, value: int) -> None:
        _check_int("max_position_embeddings", value, 2)
        self.seq_len = value - 1

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads
