"""What an engine checks about the caller's model before every batch: has it changed since compiling?

An engine shares the caller's model; it does not copy it. Some changes it follows exactly (in-place
writes to parameters and buffers: their version counters key the cached activations); the others
the traced graph cannot follow, because tracing baked them in, so they are refused with a
:class:`ModelError` that says to compile again:

- a parameter, buffer or module replaced, or moved to another dtype or device (identity);
- a module switched to training mode;
- a module's plain setting changed (``block.scale = 3.0``, ``pool.count_include_pad = False``,
  ``self.dims[0] = 3``): a Python number, string, function, or a tuple, list or dict of them that a
  forward reads is a constant in the traced graph;
- a forward hook or pre-hook added or removed, on any module or globally: the trace ran a module's
  hooks as they were (or none);
- a plain tensor attribute the graph reads (``self.mask = torch.rand(...)``, not a buffer) changed
  in place or replaced: no version counter of the parameters and buffers covers it.

An engine that runs only the caller's eager model (``plan="full"``) follows the last three
instead: :meth:`Settings.now` keys its cached unoccluded output.
"""

from __future__ import annotations

import types
from typing import NamedTuple

from torch import nn
from torch.nn.modules import module as torch_module

from kfx.errors import ModelError
from kfx.passes.trace import training_mode_error

# A setting is a value the trace copies into the graph as a constant; functions and classes are
# compared by identity. Lists and dicts of settings count too (``self.dims = [2, 3]``, read as
# ``x.mean(self.dims)``), compared by value as they were at compile time: an in-place edit of one
# left maps silently wrong. Empty ones and ones holding anything else (a forward's cache of
# tensors) are left alone.
_SCALARS = (bool, int, float, complex, str, bytes, type(None))
_CALLABLES = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, type)


def _frozen(value):
    """``value`` as a hashable setting (lists and dicts as tuples; a tuple of plain values is its
    own frozen form), or _NOT_A_SETTING."""
    if isinstance(value, _SCALARS + _CALLABLES):
        return value
    if isinstance(value, dict):
        if not value or not all(isinstance(k, (str, int)) for k in value):
            return _NOT_A_SETTING
        items = tuple((k, _frozen(v)) for k, v in value.items())
        return _NOT_A_SETTING if any(v is _NOT_A_SETTING for _, v in items) else items
    if not isinstance(value, (tuple, list)) or (isinstance(value, list) and not value):
        return _NOT_A_SETTING
    items = tuple(_frozen(v) for v in value)
    if any(v is _NOT_A_SETTING for v in items):
        return _NOT_A_SETTING
    return value if isinstance(value, tuple) and all(f is v for f, v in zip(items, value)) else items


def settings(module: nn.Module) -> tuple[tuple[str, object], ...]:
    """A module's own plain settings, frozen: public attributes (training aside, checked on its own)
    whose values are numbers, strings, functions, classes, or tuples, lists and dicts of them."""
    found = []
    for key, value in vars(module).items():
        if key[0] != "_" and key != "training":
            frozen = _frozen(value)
            if frozen is not _NOT_A_SETTING:
                found.append((key, frozen))
    return tuple(found)


class Settings:
    """The model's settings and hooks at compile time, with references to where they live, so that
    checking them before a batch is a flat loop over dict lookups (with the identity walk, 0.3-0.6 ms
    for ResNet-50's 151 modules on our 2-core machine; the modules themselves are the same objects while the identity check passes)."""

    def __init__(self, model: nn.Module, attributes: dict[str, tuple[nn.Module, str]]):
        """``attributes``: the plain tensor attributes the traced graph reads, by path: (owner, name)."""
        self.values = [
            (path, module.__dict__, key, value, value is not module.__dict__[key])
            for path, module in model.named_modules()
            for key, value in settings(module)
        ]
        self.hooks = [
            (path, hooks, tuple(hooks))
            for path, module in model.named_modules()
            for hooks in (module._forward_pre_hooks, module._forward_hooks)
        ]
        self.hooks += [("(global)", hooks, tuple(hooks)) for hooks in _GLOBAL_HOOKS]
        self.tensors = [
            (path, owner.__dict__, name, getattr(owner, name), getattr(owner, name)._version)
            for path, (owner, name) in attributes.items()
        ]

    def first_change(self) -> str | None:
        """What changed since compiling, as an error message; None if nothing did."""
        for path, now, key, value, mutable in self.values:
            current = now.get(key, _MISSING)
            if mutable and current is not _MISSING:
                current = _frozen(current)
            if current is not value and current != value:
                return (
                    f"module {path or '(root)'!r} changed its setting {key} after kfx.compile "
                    f"({value!r} -> {'(deleted)' if current is _MISSING else repr(current)}); the compiled "
                    "graph holds the old value as a constant. Compile again for the changed model"
                )
        for path, hooks, keys in self.hooks:
            # handle ids only grow: a removed hook and a new one never look alike
            if len(hooks) != len(keys) or (keys and tuple(hooks) != keys):
                where = "the global forward hooks" if path == "(global)" else f"module {path or '(root)'!r}"
                return (
                    f"{where}: forward hooks were added or removed after kfx.compile; the compiled engine "
                    "runs the hooks that were there when it was compiled. Compile again (a module with "
                    "hooks then runs densely), or restore the hooks"
                )
        for path, now, name, tensor, version in self.tensors:
            if now.get(name) is not tensor or tensor._version != version:
                return (
                    f"the model's tensor attribute {path!r} changed after kfx.compile; it is a plain "
                    "attribute, not a parameter or buffer, so kfx cannot tell when its cached activations "
                    f"go stale. Register it (self.register_buffer({name!r}, tensor)) and compile again"
                )
        return None

    def now(self, model: nn.Module) -> tuple:
        """The settings, hooks and plain tensor attributes as they are now, as one hashable value: an
        engine that runs only the caller's eager model follows changes to them (as kfx.NaiveEngine
        does) by keying its cached unoccluded output on this, instead of refusing them."""
        tensors = tuple(
            (id(now.get(name)), getattr(now.get(name), "_version", None)) for _, now, name, *_ in self.tensors
        )
        return settings_key(model), tensors


def settings_key(model: nn.Module) -> tuple:
    """Every module's settings and hook ids, and the global hooks', as one hashable value: the
    drop-ins recompile their cached engines when it changes (an engine would refuse to run)."""
    per_module = tuple(
        (settings(module), tuple(module._forward_pre_hooks), tuple(module._forward_hooks))
        for module in model.modules()
    )
    return per_module, *(tuple(hooks) for hooks in _GLOBAL_HOOKS)


_GLOBAL_HOOKS = (torch_module._global_forward_pre_hooks, torch_module._global_forward_hooks)
_MISSING = object()
_NOT_A_SETTING = object()


class ModelState(NamedTuple):
    """One walk over the model's modules, taken at compile time and before every batch."""

    identity: tuple  # every module's id, and (path, name, id, data_ptr, dtype, device) of every tensor
    versions: tuple[int, ...]  # the tensors' version counters, in the same order
    training: str | None  # the first module in training mode; None in eval

    def check_unchanged_since(self, compiled: ModelState, compiled_settings: Settings | None) -> None:
        """ModelError unless this model is the one the engine was compiled for, in eval mode, with
        its settings and hooks (unless ``compiled_settings`` is None), up to in-place writes to its
        tensors (which the engine follows)."""
        if self.training is not None:
            raise training_mode_error(self.training, "running a kfx engine")
        if self.identity != compiled.identity:
            raise ModelError(
                "the model's parameters, buffers or modules were replaced (or moved to another dtype or "
                "device) after kfx.compile, and the compiled graph still holds the old ones; compile a new "
                "engine for the changed model"
            )
        change = None if compiled_settings is None else compiled_settings.first_change()
        if change is not None:
            raise ModelError(change)


def model_state(model: nn.Module) -> ModelState:
    """The model's :class:`ModelState`: one pass over its modules (the engine takes it before every
    batch; about half the time of named_parameters + named_buffers + a training scan)."""
    identity, versions, training = [], [], None
    for prefix, module in model.named_modules():
        if training is None and module.training:
            training = prefix or type(model).__name__
        identity.append(id(module))
        for tensors in (module._parameters, module._buffers):
            for name, t in tensors.items():
                if t is not None:
                    identity.append((prefix, name, id(t), t.data_ptr(), t.dtype, t.device))
                    versions.append(t._version)
    return ModelState(tuple(identity), tuple(versions), training)
