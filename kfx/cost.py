"""The static cost model (docs/design.md §2.7): FMAs per layer, full vs incremental, with no inference.

Q_l = (C_in/groups * k_h * k_w) * (C_out * H_out * W_out) for every conv ([TR] Eq. 9); the
incremental cost Q_inc,l uses the changed box instead of the full output ([TR] Eq. 11). Layers that
run densely (the global tail: Linear, and any conv after the projection to full) count fully in both,
as the paper counts its FC layers. Pools and point-wise ops count zero, as in the paper.
With projective-field thresholding (tau < 1, docs/design.md §4.1) the changed boxes are the capped ones that
patch propagation computed, so the same sums give the paper's speedups with tau ([TR] Fig. 7a).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import fx, nn

from kfx.passes.layout import spatial_dims
from kfx.passes.local import local_spec
from kfx.passes.patch_prop import META_KEY, State, input_axes, spatial_size
from kfx.passes.transposed import transposed_spec

__all__ = ["LayerCost", "CostReport", "static_cost"]


@dataclass(frozen=True)
class LayerCost:
    """FMAs of one layer for one patch position: full inference vs incremental."""

    node: str
    op: str
    full: int
    incremental: int
    box: tuple[int, ...] | None  # changed box (h, w) of the output; None if the layer runs densely
    out: tuple[int, ...] | None  # full output (H, W), one entry per spatial axis


@dataclass(frozen=True)
class CostReport:
    """Per-layer FMAs and the theoretical speedup of incremental inference."""

    layers: tuple[LayerCost, ...]
    tau: float = 1.0  # projective-field threshold the boxes were capped with (1: exact)
    # How channel concatenations merged boxes: "union" ([TR] Eq. 20, the engine's) or "last" (the
    # paper's published accounting, kfx.paper_cost: not exact).
    concat: str = "union"

    @property
    def full_fmas(self) -> int:
        return sum(layer.full for layer in self.layers)

    @property
    def incremental_fmas(self) -> int:
        return sum(layer.incremental for layer in self.layers)

    @property
    def theoretical_speedup(self) -> float:
        """(sum Q + dense tail) / (sum Q_inc + dense tail), docs/design.md §2.7."""
        return self.full_fmas / max(self.incremental_fmas, 1)

    def __str__(self) -> str:
        rows = [f"{'node':<28} {'op':<18} {'box':>9} {'out':>9} {'full MFMA':>11} {'inc MFMA':>10}"]
        for layer in self.layers:
            box = "dense" if layer.box is None else "x".join(map(str, layer.box))
            out = "" if layer.out is None else "x".join(map(str, layer.out))
            rows.append(
                f"{layer.node:<28} {layer.op:<18} {box:>9} {out:>9} {layer.full / 1e6:>11.2f} {layer.incremental / 1e6:>10.2f}"
            )
        rows.append(
            f"total {self.full_fmas / 1e9:.3f} GFMA full, {self.incremental_fmas / 1e9:.3f} GFMA incremental: "
            f"theoretical speedup {self.theoretical_speedup:.2f}x"
            + ("" if self.tau == 1 else f" (approximate: tau = {self.tau:g})")
            + (
                ""
                if self.concat == "union"
                else " (the paper's accounting: a concat takes its last input's box)"
            )
        )
        return "\n".join(rows)


def _op_name(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    return getattr(node.target, "__name__", str(node.target))


def static_cost(gm: fx.GraphModule, tau: float = 1.0, concat: str = "union") -> CostReport:
    """Cost of every conv and linear layer of an annotated graph (kfx.passes.patch_prop).

    ``tau`` and ``concat`` are recorded only: the boxes in ``node.meta`` already carry them.
    """
    modules = dict(gm.named_modules())
    axes = input_axes(gm)
    layers = []
    for node in gm.graph.nodes:
        meta = node.meta.get(META_KEY)
        if meta is None or meta.state is State.CONST or node.op not in ("call_module", "call_function"):
            continue
        out_hw = spatial_size(node, axes)
        if node.op == "call_module" and isinstance(modules[node.target], nn.Linear):
            linear = modules[node.target]
            rows = math.prod(node.meta["tensor_meta"].shape[:-1])
            fmas = rows * linear.in_features * linear.out_features
            if meta.state is State.PATCH:  # over the channels of a channels-last map: the box's rows only
                box = tuple(b.width for b in meta.box)
                shape = node.meta["tensor_meta"].shape
                full_size = tuple(shape[d] for d in spatial_dims(meta.spatial, len(shape), axes))
                incremental = fmas * math.prod(box) // math.prod(full_size)
                layers.append(LayerCost(node.name, "Linear", fmas, incremental, box, full_size))
            else:
                layers.append(LayerCost(node.name, "Linear", fmas, fmas, None, None))
            continue
        source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        in_hw = spatial_size(source, axes) if source is not None else None
        transposed = transposed_spec(node, modules) if in_hw else None
        if transposed is not None:  # counted per input pixel: the window's, or the whole map's
            full = transposed.fmas_per_input * math.prod(in_hw)
            read = tuple(r.width for r in meta.read) if meta.state is State.PATCH else None
            incremental = transposed.fmas_per_input * math.prod(read) if read else full
            box = tuple(b.width for b in meta.box) if read else None
            layers.append(LayerCost(node.name, _op_name(node, modules), full, incremental, box, out_hw))
            continue
        spec = local_spec(node, modules, in_hw) if (in_hw and out_hw) else None
        if spec is None or spec.kind != "conv":
            continue
        full = spec.fmas_per_output * math.prod(out_hw)
        if meta.state is State.PATCH:
            box = tuple(b.width for b in meta.box)
            incremental = spec.fmas_per_output * math.prod(box)
        else:
            box, incremental = None, full
        layers.append(LayerCost(node.name, _op_name(node, modules), full, incremental, box, out_hw))
    return CostReport(tuple(layers), tau, concat)
