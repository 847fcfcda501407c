"""Fast paths that leave the model's definition alone: CPU training kernels swapped in place."""

from .kernels import remove_cpu_kernels, use_cpu_kernels

__all__ = ["remove_cpu_kernels", "use_cpu_kernels"]
