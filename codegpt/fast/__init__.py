"""Performance code that stays out of the uploaded model file: the KV-cache decoder behind sampling."""

from .decoder import FastDecoder, KVDecoder, ModelDecoder, plain_kind, unknown_part

__all__ = ["FastDecoder", "KVDecoder", "ModelDecoder", "plain_kind", "unknown_part"]
