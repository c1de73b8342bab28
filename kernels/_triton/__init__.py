"""Triton kernels for incremental inference; the only place in kfx that imports triton.

Each op is a ``_op_kernel`` (triton.jit) plus an ``op_triton`` host launcher that computes grid and
block sizes; the torch functions in kfx.kernels.reference are their oracles:

    gather_paste_triton      paste(gather_windows(...)) in one launch          (docs/design.md §2.4)
    project_triton           reference.project                                 (docs/design.md §2.6)
    incremental_conv_triton  F.conv2d over gather_paste's windows, fused, + bias

Kernels take CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set before this package was
first imported (triton.jit picks the interpreter at decoration time). This package imports
without triton too; then :func:`available` is False and the launchers raise. Dispatch on
``available(tensor.device)``.
"""

from __future__ import annotations

import torch

__all__ = [
    "IMPORT_ERROR",
    "available",
    "interpreted",
    "gather_paste_triton",
    "project_triton",
    "incremental_conv_triton",
]

try:
    from kfx.kernels._triton._host import interpreted
    from kfx.kernels._triton.conv import incremental_conv_triton
    from kfx.kernels._triton.gather_paste import gather_paste_triton
    from kfx.kernels._triton.project import project_triton

    IMPORT_ERROR: ImportError | None = None
except ImportError as error:  # triton missing or broken: keep the names, fail on use
    IMPORT_ERROR = error

    def interpreted() -> bool:
        return False

    def _missing(*args, **kwargs):
        raise RuntimeError(f"kfx Triton kernels unavailable: {IMPORT_ERROR}")

    gather_paste_triton = project_triton = incremental_conv_triton = _missing


def available(device: torch.device | str | None = None) -> bool:
    """Whether triton imports and the kernels can run: on ``device`` if given (CUDA tensors need a
    CUDA device; CPU tensors need the interpreter), else on some device.

    >>> isinstance(available(), bool)
    True
    """
    if IMPORT_ERROR is not None:
        return False
    if device is not None:
        kind = torch.device(device).type
        if kind == "cuda":
            return torch.cuda.is_available()
        return kind == "cpu" and interpreted()
    return interpreted() or torch.cuda.is_available()
