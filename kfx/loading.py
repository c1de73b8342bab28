"""``kfx.load``: a saved engine (``engine.save``, kfx/persist.py) back for its model, without the
check of the traced graph against the eager model, which the saved fingerprint stands for.

It lives apart from kfx/persist.py (the file format, which the engine uses to save itself) so that
the engine does not depend on the module that compiles engines again: load -> compile, and
engine -> persist, with no cycle.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx, nn

from kfx.engine import Engine, compile
from kfx.errors import InputError, KfxError, ModelError
from kfx.passes.trace import checked_elsewhere
from kfx.persist import (
    _check_expected,
    _mismatch,
    _patch_from,
    _plan_options,
    _read,
    _tuning_from,
    fingerprint,
)

__all__ = ["load"]


def load(
    path,
    model: nn.Module,
    *,
    image_shape=None,
    patch=None,
    leaf_modules: tuple = (),
    autowrap_functions: tuple = (),
) -> Engine:
    """The engine saved at ``path`` (by ``engine.save``), for ``model``, without compiling it again.

    ``model`` must be the saved engine's architecture: the same traced graph, submodules and
    settings, parameter and buffer names, shapes, dtypes and devices (else :class:`ModelError`,
    saying what differs); its weights may differ, as after ``load_state_dict``. Pass the same
    ``leaf_modules`` / ``autowrap_functions`` as to ``kfx.compile``. ``image_shape`` and ``patch``,
    if given, must be the saved engine's (else :class:`InputError` / :class:`PatchError`): a cache
    lookup states what it expects. A missing, damaged or foreign file, or one saved by another kfx
    version, raises :class:`InputError`.

    The loaded engine is the one ``kfx.compile`` builds for the same arguments (the same boxes,
    program, cost and memory models, batch size), minus the check of the traced graph against the
    eager model, which the matching fingerprint stands for (kfx/persist.py).
    """
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"kfx.load needs the torch.nn.Module the engine was saved for, got {type(model).__name__}"
        )
    record = _read(path)
    try:
        arguments, saved = record["arguments"], record["fingerprint"]
        saved_patch = _patch_from(arguments["patch"])
        dtype = getattr(torch, arguments["dtype"], None)
        tuning = _tuning_from(record["tuning"])
        plan_options = _plan_options(record["plan"])
        missing = {"code", "nodes", "modules", "tensors", "constants", "kept_whole"} - set(saved)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, KfxError) as exc:
        raise InputError(
            f"{path} is a damaged kfx engine file ({type(exc).__name__}: {exc}); compile again"
        ) from None
    if missing or not isinstance(dtype, torch.dtype):
        raise InputError(f"{path} is a damaged kfx engine file; compile the model again and save it")
    _check_expected(arguments, saved_patch, image_shape, patch, path)

    def verify(gm: fx.GraphModule) -> None:
        why = _mismatch(saved, fingerprint(gm))
        if why is not None:
            raise ModelError(
                f"the model does not match the engine saved in {path} (saved for a {record['model_class']}): "
                f"{why}. Load it for the model it was saved for, or compile this one with kfx.compile"
            )

    with checked_elsewhere(verify):
        engine = compile(
            model,
            tuple(arguments["image_shape"]),
            saved_patch,
            batch_size=arguments["batch_size"],
            dtype=dtype,
            backend=arguments["backend"],
            tau=arguments["tau"],
            global_context=arguments["global_context"],
            leaf_modules=leaf_modules,
            autowrap_functions=autowrap_functions,
            **plan_options,
        )
    if tuning is not None:
        engine = type(engine)(model, dataclasses.replace(engine.compiled, tuning=tuning))
    return engine
