"""Checks of plain arguments that several entry points share (engine, NeuroMask, explorer)."""

from __future__ import annotations

import operator

import torch

from kfx.errors import InputError

__all__ = ["as_int", "check_class_index", "check_batch_size"]


def as_int(value) -> int | None:
    """``value`` as an int if it is an integer (Python, NumPy or 0-d tensor; not bool), else None."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_class_index(target, num_classes: int) -> int:
    """``target`` (an int, a NumPy integer or a 0-d integer tensor) as a class index, else an InputError."""
    index = as_int(target)
    if index is None or not 0 <= index < num_classes:
        raise InputError(f"target must be a class index in [0, {num_classes}), got {target!r}")
    return index


def check_batch_size(batch_size) -> int:
    """A positive int number of positions per batch, else an InputError."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size
