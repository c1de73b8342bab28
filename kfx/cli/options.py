"""Option types of the ``kfx`` command line, shared by the parser and its subcommands (kfx batch).

argparse calls them; an ArgumentTypeError becomes a one-line usage error.
"""

from __future__ import annotations

import argparse
import math


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _int_pair(text: str) -> int | tuple[int, int]:
    """``16`` (square) or ``16x8`` (height x width), each at least 1."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected N or HxW (e.g. 16 or 16x8), got {text!r}")
    try:
        values = [_positive_int(part) for part in parts]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected N or HxW with positive integers (e.g. 16 or 16x8), got {text!r}"
        ) from None
    return values[0] if len(values) == 1 else (values[0], values[1])


def _int_axes(text: str) -> int | tuple[int, ...]:
    """``16`` (every axis), ``16x8`` (height x width) or ``8x16x16`` (depth x height x width)."""
    parts = text.lower().split("x")
    try:
        if len(parts) > 3:
            raise argparse.ArgumentTypeError(text)
        values = [_positive_int(part) for part in parts]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected N, HxW or DxHxW with positive integers (e.g. 16, 16x8 or 8x16x16), got {text!r}"
        ) from None
    return values[0] if len(values) == 1 else tuple(values)


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


# Fills whose content depends on where the patch is (kfx.fills), by the names kfx.Patch takes.
FILL_NAMES = ("mean_patch", "mean_image", "blur")


def _fill(text: str) -> float | tuple[float, ...] | str:
    """One float for every channel, comma-separated floats (one per channel: R,G,B, or one per lead
    of a signal), or a position-dependent fill by name (mean_patch, mean_image, blur)."""
    if text.strip() in FILL_NAMES:
        return text.strip()
    try:
        values = tuple(_finite_float(part.strip()) for part in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected a number, one number per channel (R,G,B) or one of {', '.join(FILL_NAMES)}; got {text!r}"
        ) from None
    return values[0] if len(values) == 1 else values


def _tau(text: str) -> float:
    value = _finite_float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"tau must be in (0, 1] (1 = exact), got {value}")
    return value


_DRILL_DOWN_KEYS = {
    "rule": ("rule", str),
    "queries": ("queries", int),
    "speedup": ("target_speedup", float),
    "ssim": ("target_ssim", float),
    "fraction": ("fraction", float),
    "stage1": ("stage1_stride", float),
}


def _drill_down(text: str) -> dict:
    """kfx.DrillDown's keyword arguments from ``SPEEDUP`` (the adaptive rule, e.g. ``3``),
    ``FRACTION:SPEEDUP`` (the two-stage "lowest" rule, e.g. ``0.25:3``) or ``KEY=VALUE,...`` with
    keys rule, queries, speedup, ssim, fraction, stage1 (e.g. ``ssim=0.9`` or ``rule=paper,speedup=3``).
    kfx.DrillDown checks the values together."""
    if "=" in text:
        return dict(_drill_down_pair(part) for part in text.split(","))
    fraction_text, colon, speedup_text = text.partition(":")
    if not colon:
        speedup = _finite_float(text)
        if speedup < 1.0:
            raise argparse.ArgumentTypeError(
                f"a single number is the adaptive rule's SPEEDUP (at least 1), got {speedup}; "
                "the two-stage rule takes FRACTION:SPEEDUP (e.g. 0.25:3)"
            )
        return {"target_speedup": speedup}
    fraction, speedup = _finite_float(fraction_text), _finite_float(speedup_text)
    if not 0.0 < fraction <= 1.0:
        raise argparse.ArgumentTypeError(f"FRACTION must be in (0, 1], got {fraction}")
    if speedup <= 0.0:
        raise argparse.ArgumentTypeError(f"SPEEDUP must be positive, got {speedup}")
    return {"rule": "lowest", "fraction": fraction, "target_speedup": speedup}


def _drill_down_pair(text: str) -> tuple[str, object]:
    key, _, value = (part.strip() for part in text.partition("="))
    if key not in _DRILL_DOWN_KEYS:
        raise argparse.ArgumentTypeError(
            f"unknown drill-down setting {key!r}; use {', '.join(_DRILL_DOWN_KEYS)} (e.g. ssim=0.9)"
        )
    name, kind = _DRILL_DOWN_KEYS[key]
    if kind is str:
        return name, value
    if kind is int:
        return name, _positive_int(value)
    return name, _finite_float(value)
