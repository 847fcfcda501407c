"""CPU kernels for training, swapped into a model in place.

Each class here subclasses a torch module and declares ``plain_base``, the module it stands in for:
it computes what ``plain_base`` computes (exactly, or to rounding for the GELU), holds the same
parameters and has the same state dict. ``use_cpu_kernels(model)`` changes the ``__class__`` of every
exact ``nn.Linear``, ``nn.Dropout`` and tanh ``nn.GELU`` to its kernel class; nothing is copied and
nothing changes in a saved checkpoint, so the model that goes to the Hub stays plain torch.
``remove_cpu_kernels(model)`` undoes it. The kernels pay off on a CPU and fall back to the functional
op elsewhere, so a swapped model runs on any device. Training on a CPU swaps them in; bench/bench_train.py
measures them."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GELU", "Dropout", "Linear", "remove_cpu_kernels", "use_cpu_kernels"]


class _LinearReducedPrecisionCPU(torch.autograd.Function):
    """``F.linear`` whose backward keeps both GEMM operands contiguous along the summed dimension.

    CPUs without native bf16/fp16 instructions (no AVX512-BF16/AMX: most AMD and pre-Sapphire-Rapids
    Intel parts) run reduced-precision GEMMs on a fallback kernel that is fast only when both
    operands are contiguous along the reduced dimension. ``F.linear``'s forward (x @ W^T) and its
    weight gradient (g^T @ x) already are; autograd's input gradient (g @ W, W row-major) is not,
    and costs ten times the others (README). Transposing W once (a few hundred KB) makes it an x @ W^T.
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

    plain_base = nn.Linear

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

    plain_base = nn.Dropout

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
    only that (one activation-sized tensor, where ``F.gelu`` saves x), so the backward is one multiply."""

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

    plain_base = nn.GELU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.approximate == "tanh" and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
            if torch.is_grad_enabled() and x.requires_grad:
                return _TanhGELUCPU.apply(x)
            return x * _TanhGELUCPU.gate(x, x * x)[1]
        return F.gelu(x, approximate=self.approximate)


KERNELS = (Linear, Dropout, GELU)
_KERNEL_FOR = {kernel.plain_base: kernel for kernel in KERNELS}


def use_cpu_kernels(model: nn.Module) -> nn.Module:
    """Swap the CPU kernels into ``model`` in place (``module.__class__``, see above) and return it.
    Subclasses (quantised or adapter layers) and modules with a patched ``forward`` are left alone;
    parameters, buffers, hooks and the state dict are untouched."""
    for module in model.modules():
        kernel = _KERNEL_FOR.get(type(module))
        # An exact GELU stays: torch's own kernel is the fast one.
        if kernel is not None and getattr(module, "approximate", "tanh") == "tanh" and "forward" not in vars(module):
            module.__class__ = kernel
    return model


def remove_cpu_kernels(model: nn.Module) -> nn.Module:
    """Undo :func:`use_cpu_kernels`: every kernel module in ``model`` becomes its ``plain_base`` again."""
    for module in model.modules():
        if type(module) in KERNELS:
            module.__class__ = type(module).plain_base
    return model
