"""The model's forward signature: the image is its first argument; the others keep their defaults.

Many real models take optional arguments beside the image (timm's VisionTransformer:
``forward(x, attn_mask=None, is_causal=False)``). Called with the image alone, as every occlusion
library calls it, such a forward runs with those defaults, so kfx traces it with them: torch.fx's
``concrete_args`` specialises the forward to the default values (the branches they choose are the
ones traced), and the placeholders torch.fx still makes for them, with only its own assertions of
the specialised value as users, are dropped, as are ``*args`` and ``**kwargs`` the forward never
reads. An argument without a default (or ``*args``/``**kwargs`` it reads) is a second input, which
kfx refuses: it explains models of one image.
"""

from __future__ import annotations

import inspect

from torch import fx, nn

from kfx.errors import ModelError

__all__ = ["defaulted_arguments", "keep_image_input"]

_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def defaulted_arguments(model: nn.Module) -> dict:
    """forward's arguments after the image that have defaults, with their defaults (fx's
    ``concrete_args``); empty where the signature cannot be read."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # builtins, some C extensions: fx reads the code object itself
        return {}
    return {p.name: p.default for p in parameters[1:] if p.kind in _NAMED and p.default is not p.empty}


def keep_image_input(graph: fx.Graph, defaulted: dict) -> None:
    """Drop the placeholders of the ``defaulted`` arguments (and fx's checks of their specialised
    values), leaving the image as the one input; refuse a graph with any other input."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    image, others = placeholders[:1], placeholders[1:]
    specialised = [n for n in others if _specialised_name(n.target, defaulted) or _unused_star(n)]
    reached = _reached_from(graph, specialised)
    if len(placeholders) - len(specialised) != 1 or any(n.op == "output" for n in reached):
        names = ", ".join(n.target for n in image + [n for n in others if n not in specialised])
        raise ModelError(
            f"kfx explains models with exactly one image input; this forward takes "
            f"{len(placeholders) - len(specialised)} without a default ({names}). "
            "Wrap it in a module whose forward(image) fixes the other arguments"
        )
    for node in reversed([n for n in graph.nodes if n in reached]):
        graph.erase_node(node)


def _specialised_name(target: str, defaulted: dict) -> bool:
    name, _, count = target.rpartition("_")  # fx names a concrete argument's placeholder f"{name}_{k}"
    return name in defaulted and count.isdigit()


def _unused_star(placeholder: fx.Node) -> bool:
    """``*args`` or ``**kwargs`` that the forward never reads: empty when called with the image alone."""
    return placeholder.target.startswith("*") and not placeholder.users


def _reached_from(graph: fx.Graph, roots: list[fx.Node]) -> set[fx.Node]:
    reached = set(roots)
    for node in graph.nodes:  # topological order: a node's inputs come before it
        if any(i in reached for i in node.all_input_nodes):
            reached.add(node)
    return reached
