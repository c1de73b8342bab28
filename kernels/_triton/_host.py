"""Host-side checks shared by the launchers: which tensors a launch accepts, and block sizes."""

from __future__ import annotations

import torch
import triton

__all__ = ["interpreted", "check_tensors", "origins", "pow2_at_least"]


def interpreted() -> bool:
    """Whether this module's kernels were built for the interpreter (TRITON_INTERPRET=1 when
    triton.jit ran, i.e. at first import of kfx.kernels._triton): then they take CPU tensors."""
    from triton.runtime.interpreter import InterpretedFunction

    from kfx.kernels._triton._window import _window_source

    return isinstance(_window_source, InterpretedFunction)


def check_tensors(op: str, *tensors: torch.Tensor) -> torch.device:
    """All on one device the kernels can run on; returns it."""
    device = tensors[0].device
    for t in tensors:
        if t.device != device:
            raise ValueError(f"{op}: tensors on different devices ({device} and {t.device})")
    if device.type != "cuda" and not interpreted():
        raise RuntimeError(
            f"{op}: Triton kernels need CUDA tensors (got {device}); set TRITON_INTERPRET=1 before "
            "importing kfx.kernels._triton to run them on CPU tensors (slow, for tests)"
        )
    return device


def origins(op: str, name: str, origin: torch.Tensor, n: int) -> torch.Tensor:
    """An [N, 2] integer (y, x) table, contiguous (any integer dtype; loaded and cast in-kernel)."""
    if origin.shape != (n, 2) or origin.dtype.is_floating_point or origin.dtype == torch.bool:
        raise ValueError(
            f"{op}: {name} must be an integer tensor [{n}, 2], got {origin.dtype} {tuple(origin.shape)}"
        )
    return origin.contiguous()


def pow2_at_least(value: int, low: int, high: int) -> int:
    """next_power_of_2(value) clamped to [low, high]."""
    return max(low, min(high, triton.next_power_of_2(max(1, value))))
