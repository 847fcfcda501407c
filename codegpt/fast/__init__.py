"""Performance code that stays out of the uploaded model file: CPU training kernels swapped into a
model in place (``kernels``), and the KV-cache decoder behind sampling (``decoder``)."""

from .decoder import FastDecoder, KVDecoder, ModelDecoder, plain_kind, unknown_part
from .kernels import remove_cpu_kernels, use_cpu_kernels

__all__ = [
    "FastDecoder", "KVDecoder", "ModelDecoder", "plain_kind", "remove_cpu_kernels", "unknown_part", "use_cpu_kernels",
]
