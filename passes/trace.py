"""Pass 1: trace a model into a functional torch.fx graph and record every node's shape.

Requires: an nn.Module in eval mode with one tensor input.
Ensures: a GraphModule with no in-place ops (so cached base activations can never be overwritten),
that shares the caller's parameters but not its containers, with ``node.meta["tensor_meta"]`` set
on every tensor-valued node (torch.fx's ShapeProp).
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from kfx.errors import ModelError, TraceError
from kfx.passes.ops import INPLACE_TO_FUNCTIONAL

__all__ = ["require_eval_module", "trace", "functionalize", "propagate_shapes"]


def require_eval_module(model, caller: str) -> None:
    """Raise ModelError unless ``model`` is an nn.Module with every submodule in eval mode."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"{caller} needs a torch.nn.Module, got {type(model).__name__}")
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise ModelError(
            f"the model is in training mode (e.g. module {training[0]!r}); dropout and batch norm would "
            f"change the answer at every call. Call model.eval() before {caller}"
        )


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model`` and rewrite its in-place ops; raise kfx errors on failure."""
    require_eval_module(model, "kfx.compile")
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many kinds (TraceError, TypeError, NotImplementedError...)
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}. kfx needs a model "
            "whose forward has no control flow on tensor values; move such code out of forward, or mark the "
            "offending submodule as a leaf with a custom torch.fx.Tracer"
        ) from exc
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        names = ", ".join(n.target for n in placeholders)
        raise ModelError(
            f"kfx explains models with exactly one image input; this forward takes {len(placeholders)} ({names}). "
            "Wrap it in a module whose forward(image) fixes the other arguments"
        )
    functionalize(gm)
    return gm


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, leaf = target.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, leaf, module)


def functionalize(gm: fx.GraphModule) -> None:
    """Replace in-place ops by their out-of-place twins, in place on ``gm``.

    In-place activations (``ReLU(inplace=True)``, ``F.relu(x, inplace=True)``, ``x += y``,
    ``x.relu_()``) would overwrite tensors that kfx keeps as base activations. After tracing, every
    later use already refers to the op's result node, so the out-of-place op computes the same values.
    A module with ``inplace=True`` is replaced by a shallow copy in ``gm`` only: the caller's model
    is left untouched.
    """
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if getattr(module, "inplace", False) is True:
                functional = copy.copy(module)
                functional.inplace = False
                _set_submodule(gm, node.target, functional)
        elif node.op == "call_function":
            if node.target in INPLACE_TO_FUNCTIONAL:
                node.target = INPLACE_TO_FUNCTIONAL[node.target]
            if node.kwargs.get("inplace") is True:
                node.kwargs = {**node.kwargs, "inplace": False}
        elif node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("_"):
            functional = node.target[:-1]
            if hasattr(torch.Tensor, functional):
                node.target = functional
    gm.recompile()


def propagate_shapes(gm: fx.GraphModule, example: torch.Tensor) -> None:
    """Run ``gm`` once on ``example`` and record each node's TensorMetadata (torch.fx ShapeProp)."""
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example)
    except Exception as exc:
        raise ModelError(
            f"the model failed on an input of shape {list(example.shape)} and dtype {example.dtype}: "
            f"{type(exc).__name__}: {exc}. Check image_shape against what the model expects"
        ) from exc
