"""A static memory model of one batch, so that ``max_memory`` can choose the batch size.

Incremental inference holds, per patch position, the changed box of every live value (a copy of
the base tensor only after the projection to full), plus the read-in windows of the op that runs.
The generated fx code frees each value after its last use, so the peak is the largest sum of live
values over the program, walked in graph order. The per-image part (the unoccluded image's base
activations, padded) does not grow with the batch. Estimates, not measurements: the benchmark
(benchmarks/compare.py) measures the real peak next to them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import fx

from kfx.passes.layout import spatial_dims
from kfx.passes.patch_prop import META_KEY, SHAPE_ROLES, State

__all__ = ["MemoryEstimate", "FULL_CHUNK_FLOOR", "estimate_memory", "parse_bytes"]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


# Full inference on chunks this large (in live activation bytes) keeps our cores busy: per-call
# overheads are small next to the work (a 224x224 ResNet-50 chunk of 7 images, a 3-D volume alone).
FULL_CHUNK_FLOOR = 64 * 2**20


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one run: ``per_image`` once (base activations), ``per_position`` for each position
    of a batch at its peak; ``full_per_position``: one occluded copy's live activations at the peak
    of the model's own forward (full inference, the other path a plan may take)."""

    per_image: int
    per_position: int
    full_per_position: int = 0

    def batch_bytes(self, batch_size: int) -> int:
        return self.per_image + batch_size * self.per_position

    def full_inference_chunk(self, batch_size: int) -> int:
        """Occluded copies per forward when a batch of ``batch_size`` positions runs by full
        inference: as many as fit in what the incremental program holds for the batch (or
        FULL_CHUNK_FLOOR), so that timing or choosing full inference never raises the engine's peak
        far above the batch size's (a 3-D volume's forward holds a hundred times a position's box)."""
        if self.full_per_position <= 0:
            return batch_size
        budget = max(batch_size * self.per_position, FULL_CHUNK_FLOOR)
        return max(1, min(batch_size, budget // self.full_per_position))

    def largest_batch(self, max_memory: int) -> int:
        """The largest batch whose estimate fits ``max_memory`` bytes (0 if none does)."""
        return max(0, (max_memory - self.per_image) // max(self.per_position, 1))


def parse_bytes(value) -> int:
    """An int of bytes, or a string such as "2GB", "512MiB"; anything else -> ValueError."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int):
        return value
    text = str(value).strip().lower().replace(" ", "")
    number = text.rstrip("kmgib")
    unit = text[len(number) :]
    if unit not in _UNITS or not number:
        raise ValueError(value)
    return int(float(number) * _UNITS[unit])


def _shapes(node: fx.Node) -> list[tuple[int, ...]]:
    """Shapes of a node's tensors: one, or several for ops returning a tuple (split, chunk)."""
    meta = node.meta.get("tensor_meta")
    metas = [meta] if hasattr(meta, "shape") else meta if isinstance(meta, (tuple, list)) else []
    return [tuple(m.shape) for m in metas if hasattr(m, "shape")]


def _numel_per_image(node: fx.Node) -> int:
    return sum(math.prod(shape) for shape in _shapes(node))


def _patch_numel(node: fx.Node, box) -> int:
    """Elements of one position's changed box: each tensor's channels (every dim but the batch and
    the spatial ones, wherever a channels-last map has them) times the box volume."""
    meta = node.meta.get(META_KEY)
    spatial = getattr(meta, "spatial", None)
    channels = 0
    for shape in _shapes(node):
        if len(shape) >= len(box) + 1:
            dims = spatial_dims(spatial, len(shape), len(box))
            channels += math.prod(size for d, size in enumerate(shape) if d != 0 and d not in dims)
    return channels * math.prod(b.width for b in box)


def _value_numel(node: fx.Node) -> int:
    """Elements one position adds for this node's value in the incremental program."""
    meta = node.meta.get(META_KEY)
    if meta is None or meta.state is State.CONST or meta.role in SHAPE_ROLES or meta.role == "mean_delta":
        return 0 if meta is None or meta.role != "mean_delta" else _numel_per_image(node)
    if meta.state is State.PATCH and meta.box is not None:
        return _patch_numel(node, meta.box)
    return _numel_per_image(node)  # dense: a full copy per position


def _scratch_numel(node: fx.Node) -> int:
    """Read-in windows a local op gathers before it runs, twice: the gathered copy and the conv
    library's reordered copy of it (oneDNN's blocked layout); both are freed when the op ends."""
    meta = node.meta.get(META_KEY)
    if meta is None or meta.read is None or not node.all_input_nodes:
        return 0
    return 2 * _patch_numel(node.all_input_nodes[0], meta.read)


def estimate_memory(gm: fx.GraphModule, slot_sources: list[str], itemsize: int) -> MemoryEstimate:
    """Liveness walk over an annotated graph (kfx.passes.patch_prop) in graph order."""
    nodes = list(gm.graph.nodes)
    last_use = {node: i for i, node in enumerate(nodes)}
    for i, node in enumerate(nodes):
        for source in node.all_input_nodes:
            last_use[source] = i
    live: dict[fx.Node, int] = {}
    live_full: dict[fx.Node, int] = {}  # the same walk for the model's own forward on one image
    peak = peak_full = 0
    for i, node in enumerate(nodes):
        live[node] = _value_numel(node)
        live_full[node] = 0 if node.op == "get_attr" else _numel_per_image(node)
        peak = max(peak, sum(live.values()) + _scratch_numel(node))
        peak_full = max(peak_full, sum(live_full.values()))
        for source in [n for n in live if last_use[n] <= i]:
            del live[source], live_full[source]
    by_name = {node.name: node for node in nodes}
    per_image = sum(_numel_per_image(by_name[name]) for name in slot_sources)
    return MemoryEstimate(per_image * itemsize, peak * itemsize, peak_full * itemsize)
