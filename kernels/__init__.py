"""Incremental-inference kernels: batched window gather + patch paste, projection to full, conv.

One semantic function, several implementations: ``kfx.kernels.reference`` (plain torch: the CPU
path and the oracle) and ``kfx.kernels._triton`` (Triton: CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1). The functions here dispatch on the backend the engine was compiled with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kfx.errors import InputError
from kfx.kernels.reference import gather_paste, gather_windows, pad_base, paste, project

__all__ = [
    "BACKENDS",
    "resolve_backend",
    "read_windows",
    "incremental_conv",
    "project_to_full",
    "gather_windows",
    "gather_paste",
    "pad_base",
    "paste",
    "project",
]

BACKENDS = ("auto", "torch", "triton")


def _triton_kernels():
    from kfx.kernels import _triton

    return _triton


def resolve_backend(backend: str, device: torch.device, axes: int = 2) -> str:
    """ "auto" -> "triton" for CUDA models of 2-d images when triton runs there, else "torch"; check
    explicit choices. The Triton kernels are written for 2-d maps: 1-d signals and 3-d volumes run
    on the torch kernels, which are N-d."""
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "triton" and axes != 2:
        raise InputError(
            f"backend='triton' has kernels for 2-d images only, and this input has {axes} spatial axes; "
            "use backend='torch' or 'auto' (which picks torch for 1-d and 3-d inputs)"
        )
    if backend == "torch" or (backend == "auto" and (device.type != "cuda" or axes != 2)):
        return "torch"  # without importing triton: it is slow to import and pointless here
    usable = _triton_kernels().available(device)
    if backend == "auto":
        return "triton" if device.type == "cuda" and usable else "torch"
    if not usable:
        reason = _triton_kernels().IMPORT_ERROR or (
            "CPU tensors need TRITON_INTERPRET=1 set before kfx's Triton kernels are first imported"
            if device.type == "cpu"
            else "no CUDA device is available"
        )
        raise InputError(f"backend='triton' cannot run on {device}: {reason}. Use backend='torch' or 'auto'")
    return "triton"


def read_windows(backend, padded, origin, size, patch, patch_offset, *, inside=False, pad_value=0.0):
    """Windows [N, C, h, w] of a padded base at ``origin`` with each patch pasted at ``patch_offset``."""
    if backend == "triton":
        return _triton_kernels().gather_paste_triton(
            padded, origin, size, patch, patch_offset, pad_value=pad_value
        )
    return gather_paste(padded, origin, size, patch, patch_offset, inside=inside)


def incremental_conv(
    backend,
    padded,
    origin,
    size,
    patch,
    patch_offset,
    weight,
    bias,
    stride,
    dilation,
    groups,
    *,
    inside=False,
):
    """Conv (no padding) over the read-in windows; Triton fuses gather, paste and conv in one kernel."""
    if backend == "triton":
        return _triton_kernels().incremental_conv_triton(
            padded,
            origin,
            size,
            patch.contiguous(),
            patch_offset,
            weight,
            bias,
            stride=stride,
            dilation=dilation,
            groups=groups,
        )
    windows = gather_paste(padded, origin, size, patch, patch_offset, inside=inside)
    return F.conv2d(windows, weight, bias, stride, 0, dilation, groups)


def project_to_full(backend, base, patch, origin):
    """N copies of base [C, H, W] with each patch painted in (projection to full)."""
    if backend == "triton":
        return _triton_kernels().project_triton(base, patch, origin)
    return project(base, patch, origin)
