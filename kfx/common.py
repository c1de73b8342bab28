"""Small helpers that several parts of kfx share: the default batch size, the model's dtype and
device, (h, w) pairs, and progress bars.

A leaf module: it imports only torch, the standard library, kfx.errors and kfx.validation (itself a
leaf), and tqdm only when a bar is made, so any part of kfx can import it without a cycle.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain

import torch

from kfx.errors import InputError
from kfx.validation import as_int

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "model_dtype_device",
    "int_pair",
    "int_tuple",
    "progress_bar",
    "follow_progress",
]

# Patch positions per batch when none is given: large enough to keep the incremental program's
# batched kernels busy, small enough that a typical CNN's batch fits in a few GB.
DEFAULT_BATCH_SIZE = 64


def model_dtype_device(model: torch.nn.Module, default=(None, None)):
    """The dtype and device of the model's first floating-point parameter or buffer: what its inputs
    should be. ``default`` when it has none (a model without weights takes any input).

    >>> model_dtype_device(torch.nn.Linear(2, 2).double())
    (torch.float64, device(type='cpu'))
    >>> model_dtype_device(torch.nn.ReLU(), default=(torch.float32, torch.device("cpu")))
    (torch.float32, device(type='cpu'))
    """
    for tensor in chain(model.parameters(), model.buffers()):
        if tensor.dtype.is_floating_point:
            return tensor.dtype, tensor.device
    return default


def int_pair(value, name: str, error: type[Exception] = InputError) -> tuple[int, int]:
    """``value`` as (h, w): an int stands for both, as does a sequence of one int (as torch's 2-d ops
    read their arguments); else a sequence of two. Python, NumPy and 0-d tensor integers count; bool
    and floats do not: ``error`` says what ``name`` must be.

    >>> int_pair(3, "stride"), int_pair((16, 8), "patch size"), int_pair([2], "dilation")
    ((3, 3), (16, 8), (2, 2))
    """
    numbers = int_sequence(value)
    if len(numbers) not in (1, 2):
        raise error(f"{name} must be an int or a pair of ints (h, w), got {value!r}")
    return (numbers[0], numbers[-1])


def int_sequence(value) -> tuple[int, ...]:
    """The ints of ``value``: (v,) for one int, else the items of a list, tuple or 1-d tensor of
    ints; () if ``value`` is neither (or holds a non-int)."""
    items = (value,) if as_int(value) is not None else _sequence(value)
    numbers = tuple(as_int(item) for item in items)
    return () if None in numbers else numbers


def int_tuple(value, name: str, axes: int, error: type[Exception] = InputError) -> tuple[int, ...]:
    """``value`` as one int per spatial axis (``axes`` of them): an int, or a sequence of one, stands
    for every axis, as torch's N-d ops read their arguments.

    >>> int_tuple(3, "stride", 3), int_tuple((16, 8), "patch size", 2), int_tuple([250], "patch size", 1)
    ((3, 3, 3), (16, 8), (250,))
    """
    numbers = int_sequence(value)
    if len(numbers) == 1:
        return numbers * axes
    if len(numbers) != axes:
        raise error(f"{name} must be an int or {axes} ints (one per spatial axis), got {value!r}")
    return numbers


def _sequence(value) -> tuple:
    """The items of ``value`` if it is a list, a tuple or a 1-d tensor, else () (no pair in it)."""
    if isinstance(value, (list, tuple)) or (isinstance(value, torch.Tensor) and value.dim() == 1):
        return tuple(value)
    return ()


def progress_bar(description: str, *, total: int = 0, show: bool = True, unit: str = "pos", **options):
    """A tqdm bar (``tqdm.auto``: a widget in notebooks, text elsewhere); with ``show`` False a silent
    one that takes the same calls, so callers need no second code path. ``options`` go to tqdm
    (``file``, ``delay``, ``leave``, ...)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit=unit, disable=not show, **options)


def follow_progress(steps: Iterable, bar):
    """Run a stream of :class:`kfx.Progress` steps to its end, moving ``bar`` to each step's count;
    the last step (None for an empty stream). The bar is closed however the stream ends."""
    step = None
    try:
        for step in steps:
            if step.total != bar.total:
                bar.total = step.total
            bar.update(step.done - bar.n)
    finally:
        bar.close()
    return step
