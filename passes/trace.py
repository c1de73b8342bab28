"""Pass 1: trace a model into a functional torch.fx graph and record every node's shape.

Requires: an nn.Module in eval mode with one tensor input (other arguments keep their defaults:
kfx.passes.signature).
Ensures: a GraphModule with no in-place ops (so cached base activations can never be overwritten)
that computes what the model computes (kfx.passes.check checks it on a random batch), that shares
the caller's parameters but not its containers, with
``node.meta["tensor_meta"]`` on every tensor-valued node (torch.fx's TensorMetadata) and
``node.meta["kfx_value"]`` on every node whose value is not a tensor (sizes, shapes, dtypes: static
for a fixed image shape, so later passes may read them as constants).
"""

from __future__ import annotations

import contextlib
import copy
import operator
import sys
from collections.abc import Callable, Iterator
from contextvars import ContextVar

import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from kfx.errors import ModelError, TraceError
from kfx.passes.ops import INPLACE_TO_FUNCTIONAL
from kfx.passes.signature import defaulted_arguments, keep_image_input

__all__ = [
    "require_eval_module",
    "training_mode_error",
    "require_traceable_module",
    "trace",
    "functionalize",
    "propagate_shapes",
    "checked_elsewhere",
    "trusted_check",
    "VALUE_KEY",
    "ATTRIBUTE_KEY",
    "plain_attributes",
]

VALUE_KEY = "kfx_value"

# Ops whose result may share storage with their (first) input: an in-place op on one of them, or on
# their input, is seen through the other. Dropout in eval and Identity return their input itself.
_ALIAS_METHODS = frozenset(
    {
        "view",
        "view_as",
        "reshape",
        "reshape_as",
        "transpose",
        "permute",
        "t",
        "narrow",
        "select",
        "expand",
        "expand_as",
        "squeeze",
        "unsqueeze",
        "flatten",
        "unflatten",
        "chunk",
        "split",
        "unbind",
        "as_strided",
        "detach",
        "diagonal",
        "movedim",
        "contiguous",
        "__getitem__",
    }
)
_ALIAS_FUNCTIONS = frozenset(
    {
        operator.getitem,
        torch.flatten,
        torch.reshape,
        torch.transpose,
        torch.permute,
        torch.squeeze,
        torch.unsqueeze,
        torch.narrow,
        torch.select,
        torch.chunk,
        torch.split,
        torch.unbind,
        torch.t,
        torch.movedim,
        torch.detach,
        nn.functional.dropout,
    }
)
_ALIAS_MODULES = (
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


def require_eval_module(model, caller: str) -> None:
    """Raise ModelError unless ``model`` is an nn.Module with every submodule in eval mode."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"{caller} needs a torch.nn.Module, got {type(model).__name__}")
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise training_mode_error(training[0], caller)


def training_mode_error(module: str, caller: str) -> ModelError:
    """The error for a model with ``module`` in training mode."""
    return ModelError(
        f"the model is in training mode (e.g. module {module!r}); dropout and batch norm would "
        f"change the answer at every call. Call model.eval() before {caller}"
    )


def require_traceable_module(model: nn.Module, caller: str) -> None:
    """Raise ModelError for modules torch.fx cannot read: compiled, scripted, or without values."""
    if hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
        raise ModelError(
            f"{caller} needs the Python module, not a torch.compile'd one: pass model._orig_mod "
            "(the module you gave torch.compile)"
        )
    if isinstance(model, torch.jit.ScriptModule):
        raise ModelError(
            f"{caller} traces Python modules with torch.fx and cannot read TorchScript: pass the nn.Module "
            "you gave torch.jit.script / torch.jit.trace"
        )
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_meta:
            raise ModelError(
                f"the model's tensor {name!r} is on the meta device (it has a shape but no values); load its "
                "weights first, e.g. model.to_empty(device='cpu') and then model.load_state_dict(...)"
            )
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
            not module.track_running_stats or module.running_mean is None
        ):
            raise ModelError(
                f"{type(module).__name__} ({name or 'the model'}) has track_running_stats=False, so even in "
                "eval mode it normalises with the statistics of the batch: each patch position's output "
                "would depend on the other positions in its batch. kfx refuses such models; give the layer "
                "running statistics (track_running_stats=True, then estimate them), or use a per-example "
                "norm (nn.InstanceNorm2d, nn.GroupNorm)"
            )


# Functions that compute padding from x.size() with Python control flow, which torch.fx cannot
# trace through: traced as one call each (kfx.passes.ops knows their padding from the static shape).
KNOWN_SHAPE_FUNCTIONS = (("timm.layers.padding", "pad_same"),)


# Modules whose forward reshapes through 6-d views that kfx cannot follow, but which kfx knows as
# a whole (kfx.passes.local: space-to-depth is a local op): traced as one call each.
KNOWN_LEAF_MODULES = (("timm.layers.space_to_depth", "SpaceToDepth"),)


def _imported(pairs: tuple[tuple[str, str], ...]) -> tuple:
    """The (module, name) pairs whose modules are imported (so the model may use them)."""
    found = (getattr(sys.modules.get(module), name, None) for module, name in pairs)
    return tuple(value for value in found if value is not None)


def _known_shape_functions() -> tuple:
    """The functions of KNOWN_SHAPE_FUNCTIONS whose modules are imported (so the model may use them)."""
    return _imported(KNOWN_SHAPE_FUNCTIONS)


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with the caller's leaf modules kept as single calls (kfx runs them densely)."""

    def __init__(self, leaf_modules: tuple[type, ...], autowrap_functions: tuple):
        super().__init__(autowrap_functions=(*_known_shape_functions(), *autowrap_functions))
        self.leaf_modules = (*_imported(KNOWN_LEAF_MODULES), *leaf_modules)
        self._names_of: tuple | None = None  # (root, {id: parameter name}, {id: buffer name})
        self.inside: list[
            tuple[str, str, type]
        ] = []  # (path, class name, class) of the submodules being traced, innermost last

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaf_modules) or super().is_leaf_module(m, qualname)

    # torch.fx names a parameter or buffer that forward reads (functional batch norms, layer
    # scales) by scanning all of the model's tensors at every read: quadratic in the model's size,
    # most of the trace time of timm models. These two overrides find the same first-found names in
    # one table per trace.
    def getattr(self, attr: str, attr_val, parameter_proxy_cache: dict):
        name = self._tensor_name(attr_val, buffers=self.proxy_buffer_attributes)
        if name is None or self.param_shapes_constant:
            return super().getattr(attr, attr_val, parameter_proxy_cache)
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]

    def create_arg(self, a):
        name = self._tensor_name(a, buffers=True)
        return super().create_arg(a) if name is None else self.create_node("get_attr", name, (), {})

    def _tensor_name(self, value, buffers: bool) -> str | None:
        """The name torch.fx's scan finds for ``value``: the first parameter that is it, else (if
        ``buffers``) the first buffer; None if none is (then torch.fx's own code decides)."""
        if not isinstance(value, torch.Tensor):
            return None
        if self._names_of is None or self._names_of[0] is not self.root:
            parameter_names, buffer_names = {}, {}
            for name, p in self.root.named_parameters():
                parameter_names.setdefault(id(p), name)
            for name, b in self.root.named_buffers():
                buffer_names.setdefault(id(b), name)
            self._names_of = (self.root, parameter_names, buffer_names)
        _, parameter_names, buffer_names = self._names_of
        if isinstance(value, nn.Parameter):
            return parameter_names.get(id(value))
        return buffer_names.get(id(value)) if buffers else None

    def call_module(self, m: nn.Module, forward, args, kwargs):
        self.inside.append((self.path_of_module(m), type(m).__name__, type(m)))
        result = super().call_module(m, forward, args, kwargs)
        self.inside.pop()  # left in place when tracing fails: the error names where it happened
        return result


def trace(model: nn.Module, leaf_modules: tuple = (), autowrap_functions: tuple = ()) -> fx.GraphModule:
    """Symbolically trace ``model`` and rewrite its in-place ops; raise kfx errors on failure.

    ``leaf_modules`` (module classes) are kept as single calls, not traced into; ``autowrap_functions``
    (plain functions called in a forward) likewise: torch.fx's own hooks for code it cannot trace.
    """
    require_eval_module(model, "kfx.compile")
    require_traceable_module(model, "kfx.compile")
    leaf_modules, defaulted = tuple(leaf_modules), defaulted_arguments(model)
    while True:
        tracer = _Tracer(leaf_modules, tuple(autowrap_functions))
        try:
            graph = tracer.trace(model, concrete_args=defaulted or None)
            break
        except Exception as exc:  # fx raises many kinds (TraceError, TypeError, NotImplementedError...)
            leaf = _registered_leaf(tracer.inside, leaf_modules)
            if leaf is None:
                _raise_trace_error(model, tracer, exc)
            leaf_modules += (leaf,)
    keep_image_input(graph, defaulted)  # optional arguments traced with their defaults
    # functional before the GraphModule is built, so that it generates its code once
    functional_modules, changed = _functionalize_graph(graph, model)
    if changed:
        graph.lint()
    gm = fx.GraphModule(model, graph, type(model).__name__)
    for target, module in functional_modules.items():
        _set_submodule(gm, target, module)  # the graph's own copies: the caller's modules are untouched
    _record_plain_attributes(model, gm)
    return gm


# Set on get_attr nodes that read a plain tensor attribute of the model (not a parameter or buffer):
# (the module that holds it, the attribute's name). The engine follows parameters and buffers only.
ATTRIBUTE_KEY = "kfx_attribute"


def _record_plain_attributes(model: nn.Module, gm: fx.GraphModule) -> None:
    """Mark the graph's reads of the model's plain tensor attributes (``self.t = torch.ones(3)``):
    the base activations are cached per version of the parameters and buffers, which do not count
    these, so the program checks that they keep the tensor and version they had at compile time."""
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        path, _, name = node.target.rpartition(".")
        try:
            owner = model.get_submodule(path)
        except AttributeError:
            continue
        plain = name not in owner._parameters and name not in owner._buffers
        if plain and isinstance(owner.__dict__.get(name), torch.Tensor):
            node.meta[ATTRIBUTE_KEY] = (owner, name)


def plain_attributes(gm: fx.GraphModule) -> dict[str, tuple[nn.Module, str]]:
    """The model's plain tensor attributes the graph reads (marked at tracing), by path: (owner, name)."""
    return {node.target: node.meta[ATTRIBUTE_KEY] for node in gm.graph.nodes if ATTRIBUTE_KEY in node.meta}


def _registered_leaf(inside: list[tuple[str, str, type]], leaf_modules: tuple) -> type | None:
    """The innermost module class, among those being traced when tracing failed, that timm registers
    as not traceable (``timm.layers.register_notrace_module``: ConvMlp, LiteMLA, ...): kfx then keeps
    it as one call, as timm's own feature extraction does, and it runs densely. None if there is none
    (or timm is not in use)."""
    fx_helpers = sys.modules.get("timm.layers._fx")
    registered = getattr(fx_helpers, "get_notrace_modules", None)
    if registered is None:
        return None
    classes = set(registered())
    for _, _, cls in reversed(inside):
        if cls in classes and cls not in leaf_modules:
            return cls
    return None


def _raise_trace_error(model: nn.Module, tracer: _Tracer, exc: Exception):
    if "does not support item assignment" in str(exc):
        raise TraceError(
            f"{type(model).__name__}'s forward assigns into a tensor in place (x[...] = v), which torch.fx "
            "cannot trace; build the new tensor out of place (torch.where, torch.cat) and retry"
        ) from exc
    where, leaf = "", "ThatModule"
    if tracer.inside:
        path, leaf, _ = tracer.inside[-1]
        where = f" (in submodule {path!r}, a {leaf})"
    raise TraceError(
        f"torch.fx could not trace {type(model).__name__}{where}: {type(exc).__name__}: {exc}. kfx needs a "
        "model whose forward has no control flow on tensor values; move such code out of forward, or keep "
        f"that submodule whole: kfx.compile(..., leaf_modules=({leaf},)) (it then runs densely)"
    ) from exc


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, leaf = target.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, leaf, module)


def _make_functional(node: fx.Node, root: nn.Module, modules: dict[str, nn.Module]) -> bool:
    """Turn an in-place op into its out-of-place twin; True if ``node`` was in place. An in-place
    module's out-of-place copy goes into ``modules`` (target -> copy) for the caller to install."""
    if node.op == "call_module":
        module = root.get_submodule(node.target)  # the original: a module called twice is in place twice
        if getattr(module, "inplace", False) is True:
            functional = copy.copy(module)  # the graph's own copy: the caller's module is untouched
            functional.inplace = False
            modules[node.target] = functional
            return True
        return False
    if node.op == "call_function":
        if node.target is operator.setitem:
            raise TraceError(
                f"node {node.format_node()} assigns into a tensor in place (x[...] = v); kfx needs a "
                "functional forward: build the new tensor out of place (torch.where, torch.cat, or "
                "x = x.clone() first) and retry"
            )
        if node.target in INPLACE_TO_FUNCTIONAL:
            node.target = INPLACE_TO_FUNCTIONAL[node.target]
            return True
        name = getattr(node.target, "__name__", "")
        if name.endswith("_") and not name.startswith("_") and getattr(torch, name, None) is node.target:
            functional = getattr(torch, name[:-1], None)
            if callable(functional):
                node.target = functional
                return True
        if node.kwargs.get("inplace") is True:
            node.kwargs = {**node.kwargs, "inplace": False}
            return True
        return False
    if node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("_"):
        functional = node.target[:-1]
        if callable(getattr(torch.Tensor, functional, None)):
            node.target = functional
            return True
        raise TraceError(
            f"node {node.format_node()} calls the in-place method .{node.target}() that kfx has no "
            "out-of-place twin for; write it out of place and retry"
        )
    return False


def _is_alias(node: fx.Node, root: nn.Module) -> bool:
    """True if ``node`` may return a view of (or the very tensor of) its first input."""
    if node.op == "call_method":
        return node.target in _ALIAS_METHODS
    if node.op == "call_function":
        return node.target in _ALIAS_FUNCTIONS
    if node.op == "call_module":
        return isinstance(root.get_submodule(node.target), _ALIAS_MODULES)
    return False


def _alias_group(node: fx.Node, root: nn.Module) -> set[fx.Node]:
    """Every node that may share storage with ``node``: its view ancestors and their view descendants."""
    first = node
    while _is_alias(first, root) and first.args and isinstance(first.args[0], fx.Node):
        first = first.args[0]
    group, todo = set(), [first]
    while todo:
        current = todo.pop()
        if current not in group:
            group.add(current)
            todo.extend(u for u in current.users if _is_alias(u, root) and u.args and u.args[0] is current)
    return group


def functionalize(gm: fx.GraphModule) -> None:
    """Replace in-place ops by their out-of-place twins, in place on ``gm``, keeping what they compute.

    An in-place op changes the tensor it is applied to, so every *later* use of that tensor sees
    the result: ``y.relu_()`` as a statement, ``F.relu(y, inplace=True)`` whose input is used again,
    ``z = y; y += 1; use(z)``. After the op becomes out of place, those later uses are rebound to its
    result node, which is what eager PyTorch computes. A mutation seen through a view
    (``y[:, :3].mul_(0)``, or ``v = y.view(...)`` used after ``y.relu_()``) has no such rebinding:
    kfx refuses it with a TraceError naming the node. An in-place op on a parameter or buffer
    (state kept across calls) is refused too.
    """
    modules, changed = _functionalize_graph(gm.graph, gm)
    for target, module in modules.items():
        _set_submodule(gm, target, module)
    if changed:  # else the code GraphModule generated when it was built is current
        gm.graph.lint()
        gm.recompile()


def _functionalize_graph(graph: fx.Graph, root: nn.Module) -> tuple[dict[str, nn.Module], bool]:
    """:func:`functionalize` on ``graph``, whose modules ``root`` holds: rewrites its nodes; returns
    the out-of-place copies of in-place modules to install (target -> module) and whether any node
    was in place."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    modules: dict[str, nn.Module] = {}
    changed = False
    for node in list(graph.nodes):
        if not _make_functional(node, root, modules):
            continue
        changed = True
        mutated = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if mutated is None:
            continue
        if mutated.op == "get_attr":
            raise TraceError(
                f"node {node.format_node()} changes the model's own tensor {mutated.target!r} in place at every "
                "call; kfx needs a forward without side effects"
            )
        position = order[node]
        aliases = _alias_group(mutated, root) - {mutated, node}
        # Views made before the op and read after it would see the change in eager mode; views made
        # after it read the rebound result below.
        seen_later = [
            a.name for a in aliases if order[a] < position and any(order[u] > position for u in a.users)
        ]
        if seen_later:
            raise TraceError(
                f"in-place op {node.format_node()} changes a tensor that is also read later through a view "
                f"({', '.join(sorted(seen_later))}); kfx cannot make that functional. Write the op out of "
                "place (y = y.relu() instead of y.relu_()) and retry"
            )
        for user in list(mutated.users):
            if user is not node and order[user] > position:
                user.replace_input_with(mutated, node)
    return modules, changed


class _ValueProp(fx.Interpreter):
    """Runs the graph once and records on each node what torch.fx's ShapeProp records and kfx reads
    (``node.meta["tensor_meta"]``: shape and dtype, as a TensorMetadata or an aggregate of them),
    plus the values of non-tensor nodes (x.size(), x.shape[2], x.dim()), and refuses a node that
    writes a tensor it reads. Not ShapeProp itself: it asks every tensor its contiguity in three
    layouts and prints a traceback for a failing node before raising (kfx raises its own error),
    which made shape propagation cost about twice the interpreter's own run on small models."""

    def run_node(self, n: fx.Node):
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            read = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            versions = [t._version for t in read]
            result = getattr(self, n.op)(n.target, args, kwargs)
        if any(t._version != v for t, v in zip(read, versions)):
            raise _mutation_error(n)
        found = []

        def tensor_meta(value):  # a tensor's metadata, without the contiguity queries kfx never reads
            if not isinstance(value, torch.Tensor):
                return value
            found.append(value)
            return _extract_tensor_metadata(value, include_contiguity=False)

        meta = fx.node.map_aggregate(result, tensor_meta)
        if found:
            n.meta["tensor_meta"] = meta
        elif _is_static(result):
            n.meta[VALUE_KEY] = result
        return result


def _mutation_error(n: fx.Node) -> TraceError:
    """A node that still changes a tensor it reads after functionalize (``out=``, a leaf module's
    in-place op): its readers would see the changed value, and kfx's cached base activations too.
    Tensors' version counters, shared by views, catch every such write, however it is spelled."""
    what = f"module {n.target}" if n.op == "call_module" else f"{getattr(n.target, '__name__', n.target)}"
    return TraceError(
        f"node {n.name} ({what}) changes a tensor it reads in place (an out= argument, or an in-place op "
        "inside a module kept whole); kfx reuses the unoccluded image's activations, so its maps would be "
        "wrong. Write it out of place (inside a leaf module: operate on x.clone(), or use x * 2 for x.mul_(2))"
    )


def _is_static(value) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_is_static(v) for v in value)
    return isinstance(value, (int, float, bool, str, torch.dtype, torch.device, torch.Size, type(None)))


def propagate_shapes(gm: fx.GraphModule, example: torch.Tensor):
    """Run ``gm`` once on ``example``; record each node's TensorMetadata and non-tensor values.

    Returns ``gm``'s output, which :func:`check_traced` reuses as the batch-of-one run it needs.
    """
    try:
        with torch.no_grad():
            return _ValueProp(gm).run(example)
    except TraceError:
        raise
    except Exception as exc:
        raise ModelError(
            f"the model failed on an input of shape {list(example.shape)} and dtype {example.dtype}: "
            f"{type(exc).__name__}: {exc}. Check image_shape against what the model expects"
        ) from exc


# While kfx.load rebuilds a saved engine: a function of the traced GraphModule that raises unless
# it is the graph that passed check_traced when the engine was saved (kfx/persist.py). It stands
# for that check (the eager model and the graph on a batch of two); a ContextVar, so each thread
# loads its own.
_TRUSTED_CHECK: ContextVar[Callable[[fx.GraphModule], None] | None] = ContextVar(
    "kfx_trusted_check", default=None
)


@contextlib.contextmanager
def checked_elsewhere(verify: Callable[[fx.GraphModule], None]) -> Iterator[None]:
    """Within this block, compiling runs ``verify(traced_graph)`` instead of :func:`check_traced`."""
    token = _TRUSTED_CHECK.set(verify)
    try:
        yield
    finally:
        _TRUSTED_CHECK.reset(token)


def trusted_check() -> Callable[[fx.GraphModule], None] | None:
    """The verifier :func:`checked_elsewhere` set, or None: then compiling runs :func:`check_traced`."""
    return _TRUSTED_CHECK.get()
