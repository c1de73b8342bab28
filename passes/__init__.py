"""kfx's torch.fx passes: trace -> shape propagation -> check -> patch propagation -> rewrite.

See passes/README.md for what each pass requires and ensures. :func:`annotate` runs the analysis
passes in order; ``build_program`` then rewrites the annotated graph.
"""

import torch
from torch import fx, nn

from kfx.passes.check import check_traced, runs_channels_last
from kfx.passes.patch_prop import META_KEY, AxisBoxes, NodePatch, State, propagate_patches
from kfx.passes.rewrite import Patches, Program, build_base_program, build_program
from kfx.passes.slots import BaseSlot
from kfx.passes.trace import functionalize, propagate_shapes, trace, trusted_check

__all__ = [
    "annotate",
    "CHANNELS_LAST_KEY",
    "META_KEY",
    "AxisBoxes",
    "BaseSlot",
    "NodePatch",
    "Patches",
    "Program",
    "State",
    "build_base_program",
    "build_program",
    "check_traced",
    "functionalize",
    "propagate_patches",
    "propagate_shapes",
    "trace",
]

# gm.meta[CHANNELS_LAST_KEY]: the traced graph runs in the channels-last layout (check.runs_channels_last).
CHANNELS_LAST_KEY = "kfx_channels_last"


def annotate(
    model: nn.Module,
    image_shape: tuple[int, ...],
    patch_size: tuple[int, ...],
    tau: float,
    dtype: torch.dtype,
    device: torch.device,
    *,
    concat: str = "union",
    global_context: str = "exact",
    leaf_modules: tuple = (),
    autowrap_functions: tuple = (),
    try_channels_last: bool = True,
) -> fx.GraphModule:
    """The traced graph of ``model``, checked against it, with shapes and changed boxes on every node.

    Runs trace (functional, in-place ops rebound), shape propagation, the check against the eager
    model (a fixed random batch of two; shape propagation's run on its first image is the check's
    batch of one) and patch propagation. Under ``checked_elsewhere`` (kfx.load) the given verifier
    replaces the check, right after tracing. ``gm.meta[CHANNELS_LAST_KEY]`` says whether the graph
    runs on a channels-last 2-d image on CPU (the check's run of the graph tries that layout first;
    under kfx.load, one more run of it); ``try_channels_last`` False (a backend that never runs that
    layout) keeps the check's run contiguous and answers False.
    """
    gm = trace(model, leaf_modules, autowrap_functions)
    verify = trusted_check()
    if verify is not None:
        verify(gm)
    example = torch.randn(2, *image_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    example = example.to(dtype=dtype, device=device)
    alone = propagate_shapes(gm, example[:1].clone())
    if verify is None:
        layout = check_traced(model, gm, example, alone, try_channels_last=try_channels_last)
    else:
        layout = try_channels_last and runs_channels_last(gm, example[:1], alone)
    gm.meta[CHANNELS_LAST_KEY] = layout
    propagate_patches(
        gm, tuple(image_shape[1:]), patch_size, tau, concat=concat, global_context=global_context
    )
    return gm
