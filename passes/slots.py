"""The base activations the incremental program keeps, and how its merges read them.

Every base activation the program reads is held, for the unoccluded image, for the whole map
(and for every image of a dataset run in flight), so the rewrite pass (passes/rewrite.py) keeps as
few as it can without recomputing anything (docs/design.md §2.5):

- a merge reads its operands only through window origins, so where a conv keeps a padded copy of
  the same value anyway, the merge reads that copy at the padding's offset (:func:`shared_slots`);
- a channel concat read only by merges is read as its pieces' windows, stacked: MONAI's dense layer
  is ``cat([x, new], 1)`` with ``x`` the previous layer's concat, and keeping every concat would
  keep each earlier feature once per later layer (quadratic in the layers); its pieces keep each
  feature once (:func:`composed_slots`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import fx

from kfx.passes.annotation import spatial_size
from kfx.passes.ops import bind_args, is_merge

__all__ = ["BaseSlot", "composed_slots", "shared_slots", "unpadded"]


@dataclass(frozen=True)
class BaseSlot:
    """One prepared base activation the program reads: ``source`` node's value, padded by
    ``margins`` (before, after) per spatial axis in axis order (for images: top, bottom, left,
    right) with ``pad_value``, as [C, *padded size]."""

    source: str
    margins: tuple[int, ...]
    pad_value: float
    whole: bool = False  # a constant computed from the weights (not a map): read as it is, no batch dim


def unpadded(node: fx.Node) -> BaseSlot:
    """``node``'s base activation as it is."""
    return BaseSlot(node.name, (), 0.0)


# A read of a slot by a step: (slot, whether the step reads it only through window origins).
Read = tuple[BaseSlot, bool]


def _concat_operands(node: fx.Node, axes: int) -> list[fx.Node] | None:
    """The operands of a channel concat of maps of its own spatial size (its value is theirs
    stacked along channels, in order), else None."""
    if node.op != "call_function" or node.target is not torch.cat or not is_merge(node):
        return None
    tensors = bind_args(node, ("tensors", "dim"), {"dim": 0})["tensors"]
    size = spatial_size(node, axes)
    if size is None or not all(isinstance(t, fx.Node) and spatial_size(t, axes) == size for t in tensors):
        return None
    return list(tensors)


def composed_slots(graph: fx.Graph, reads: Iterable[Read], axes: int) -> dict[BaseSlot, tuple[BaseSlot, ...]]:
    """Concat slots to read as the stacked windows of their pieces: slot -> the pieces' unpadded
    slots, in channel order. A concat qualifies when every read of its base (of any padding) is
    through window origins, of the base as it is: a padded copy, or a step that reads the whole
    base, would be kept anyway and serve the merges for free. A piece that qualifies is split in turn."""
    reads = list(reads)
    by_source: dict[str, list[Read]] = {}
    for slot, at_offset in reads:
        by_source.setdefault(slot.source, []).append((slot, at_offset))

    def pieces(node: fx.Node) -> tuple[BaseSlot, ...]:
        operands = _concat_operands(node, axes)
        split = operands is not None and all(
            at_offset and slot == unpadded(node) for slot, at_offset in by_source.get(node.name, [])
        )
        return tuple(p for operand in operands for p in pieces(operand)) if split else (unpadded(node),)

    nodes = {node.name: node for node in graph.nodes}
    composed = {}
    for slot, at_offset in reads:
        if (
            at_offset
            and slot == unpadded(nodes[slot.source])
            and (split := pieces(nodes[slot.source])) != (slot,)
        ):
            composed[slot] = split
    return composed


def shared_slots(reads: Iterable[Read]) -> dict[BaseSlot, BaseSlot]:
    """Unpadded base activations read only through window origins (by merges), where a local step
    keeps a padded copy of the same value anyway: the merges read that copy at an offset, so one
    copy is kept instead of two (a ResNet block's output feeds the next conv and the residual add)."""
    readers: dict[BaseSlot, list[bool]] = {}
    for slot, at_offset in reads:
        readers.setdefault(slot, []).append(at_offset)
    padded: dict[str, BaseSlot] = {}
    for slot in readers:
        if not slot.whole and any(slot.margins):
            padded.setdefault(slot.source, slot)
    return {
        slot: padded[slot.source]
        for slot, at_offset in readers.items()
        if not slot.whole and not any(slot.margins) and slot.source in padded and all(at_offset)
    }
