"""kfx's torch.fx passes: trace -> shape propagation -> patch propagation -> rewrite.

See passes/README.md for what each pass requires and ensures.
"""

from kfx.passes.patch_prop import META_KEY, AxisBoxes, NodePatch, State, propagate_patches
from kfx.passes.rewrite import BaseSlot, Patches, Program, build_program
from kfx.passes.trace import check_traced, functionalize, propagate_shapes, trace

__all__ = [
    "META_KEY",
    "AxisBoxes",
    "BaseSlot",
    "NodePatch",
    "Patches",
    "Program",
    "State",
    "build_program",
    "check_traced",
    "functionalize",
    "propagate_patches",
    "propagate_shapes",
    "trace",
]
