"""Save a compiled engine and load it again for the same model: ``engine.save(path)``, ``kfx.load(path, model)``.

What is stored is data only, read back with ``torch.load(weights_only=True)``: never the model's
weights and never code. It holds

- the compile arguments (image shape, patch, tau, global context, dtype, backend, batch size, the
  plan mode and the rates it chose with) and, for a tuned engine, what ``kfx.tune`` measured;
- a fingerprint of what ``kfx.compile`` checked: the traced graph's code, each submodule's class
  and settings, each parameter's and buffer's name, shape, dtype and device (not their values),
  and the values of other tensor constants the graph reads.

What costs most at compile time and is *not* re-derived on load is the check that the traced
graph computes what the eager model computes (the eager model and the graph, each on a batch of
two: most of compile time for models with many FLOPs, docs/design.md §3.1). Loading traces the
given model again, and refuses it (:class:`ModelError`) unless the traced graph has the saved
fingerprint: then it is the graph that passed that check.
Shapes, boxes, the incremental program, the cost and memory models are re-derived from the model
by the same code as ``kfx.compile``, so a loaded engine is exactly the engine ``kfx.compile``
would build now, and nothing here depends on how those are laid out.

Weights are not part of the fingerprint: an engine reads the model's weights live, so loading it
for a model of the same architecture with other weights (a checkpoint, a fine-tuned copy) is the
same as compiling and then calling ``load_state_dict``, which an engine follows exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch
from torch import fx

import kfx
from kfx.errors import InputError, PatchError
from kfx.fills import Baseline, Blur, MeanImage, MeanPatch, Multiply, PositionalFill
from kfx.patch import Patch
from kfx.results import Tuning

__all__ = ["save", "FORMAT", "FORMAT_VERSION", "fingerprint"]  # kfx.load: kfx/loading.py

FORMAT = "kfx-engine"
FORMAT_VERSION = 1


# -- the fingerprint ---------------------------------------------------------------------------
def _tensor_digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().to("cpu").contiguous()
    return hashlib.sha256(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"").hexdigest()


def fingerprint(gm: fx.GraphModule) -> dict:
    """What identifies the traced graph ``kfx.compile`` checked, as plain data (lists of strings).

    ``code``: a digest of the graph's Python code (the forward as traced and made functional);
    ``modules``: each module the graph calls, and its submodules: path, class and settings
    (``extra_repr``); ``tensors``: each parameter and buffer the graph reads (directly or in a module
    it calls): path, shape, dtype and device; ``constants``: a digest of every other tensor it reads
    (``get_attr`` of a plain tensor attribute), whose values are part of the computation.
    Parameter and buffer values are left out: the engine reads them live. Only what the graph's
    nodes reach counts (later passes add their own modules to the GraphModule).
    """
    modules, tensors, constants = [], [], []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            for path, module in gm.get_submodule(node.target).named_modules(prefix=node.target):
                cls = type(module)
                modules.append(f"{path}: {cls.__module__}.{cls.__qualname__}({module.extra_repr()})")
                for kind, table in (("parameter", module._parameters), ("buffer", module._buffers)):
                    tensors.extend(
                        _describe(f"{path}.{n}", kind, t) for n, t in table.items() if t is not None
                    )
        elif node.op == "get_attr":
            owner_path, _, name = node.target.rpartition(".")
            owner = gm.get_submodule(owner_path)
            value = getattr(owner, name)
            if name in owner._parameters or name in owner._buffers:
                kind = "parameter" if name in owner._parameters else "buffer"
                tensors.append(_describe(node.target, kind, value))
            elif isinstance(value, torch.Tensor):
                constants.append(f"{_describe(node.target, 'constant', value)} {_tensor_digest(value)}")
            else:
                constants.append(f"{node.target}: {type(value).__name__}")
    return {
        "code": hashlib.sha256(gm.code.encode()).hexdigest(),
        "nodes": len(gm.graph.nodes),
        "modules": modules,
        "tensors": tensors,
        "constants": constants,
        "kept_whole": _kept_whole(gm),
    }


def _describe(path: str, kind: str, tensor: torch.Tensor) -> str:
    return f"{path}: {kind} {list(tensor.shape)} {tensor.dtype} {tensor.device}"


def _kept_whole(gm: fx.GraphModule) -> list[str]:
    """Classes of non-torch modules called whole (a leaf_modules hook), for the mismatch message."""
    names = set()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            cls = type(gm.get_submodule(node.target))
            if not cls.__module__.startswith("torch."):
                names.add(cls.__qualname__)
    return sorted(names)


def _first_difference(saved: list[str], now: list[str]) -> str:
    for a, b in zip(saved, now):
        if a != b:
            return f"saved {a!r}, this model {b!r}"
    return f"saved {len(saved)} entries, this model {len(now)}"


def _mismatch(saved: dict, now: dict) -> str | None:
    """Why ``now`` (the given model's fingerprint) is not ``saved``, or None if it is."""
    hooks = (
        "if the engine was compiled with leaf_modules= or autowrap_functions=, pass the same ones to kfx.load"
    )
    if saved["kept_whole"] != now["kept_whole"]:
        kept = ", ".join(saved["kept_whole"]) or "none"
        return (
            f"the saved engine kept these module classes whole: {kept}; pass the same leaf_modules ({hooks})"
        )
    for key, what in (
        ("tensors", "its parameters and buffers (names, shapes, dtypes, devices) differ"),
        ("modules", "its submodules or their settings differ"),
        ("constants", "the tensor constants its forward reads differ"),
    ):
        if saved[key] != now[key]:
            return f"{what}: {_first_difference(saved[key], now[key])}"
    if saved["code"] != now["code"]:
        return f"its traced forward differs ({saved['nodes']} graph nodes saved, {now['nodes']} now); {hooks}"
    return None


# -- the file ------------------------------------------------------------------------------------
def _patch_record(patch: Patch) -> dict:
    return {
        "size": list(patch.size),
        "stride": list(patch.stride),
        "fill": _fill_record(patch.fill),
        "same_on_every_axis": list(patch.same_on_every_axis),
    }


# kfx's own position-dependent fills: dataclasses of numbers and tensors, so stored as data (their
# class name and fields). A fill of any other class is code, which an engine file never holds.
_POSITIONAL_FILLS = {cls.__name__: cls for cls in (MeanPatch, MeanImage, Blur, Multiply, Baseline)}


def _fill_record(fill):
    if isinstance(fill, PositionalFill):
        kind = type(fill).__name__
        if _POSITIONAL_FILLS.get(kind) is not type(fill):
            raise PatchError(
                f"engine.save cannot store the fill {fill.name()}: an engine file holds data, not code, and "
                f"only kfx's own fills ({', '.join(_POSITIONAL_FILLS)}) are data; compile the engine "
                "where it is needed instead"
            )
        fields = {f.name: getattr(fill, f.name) for f in dataclasses.fields(fill)}
        return {"positional": kind, "fields": fields}
    return fill if isinstance(fill, (float, torch.Tensor)) else list(fill)


def _fill_from(record):
    if isinstance(record, dict):
        return _POSITIONAL_FILLS[record["positional"]](**record["fields"])
    return record


def _patch_from(record: dict) -> Patch:
    size, stride, fill = tuple(record["size"]), tuple(record["stride"]), _fill_from(record["fill"])
    same_size, same_stride = record["same_on_every_axis"]
    patch = Patch(size[0] if same_size else size, stride[0] if same_stride else stride, fill=fill)
    if patch.size != size or patch.stride != stride:
        patch = patch.for_axes(len(size))
    if patch.size != size or patch.stride != stride:  # pragma: no cover - a patch for_axes cannot fit
        patch = Patch(size, stride, fill=fill)
    return patch


def _tuning_record(tuning) -> dict | None:
    return None if tuning is None else dataclasses.asdict(tuning)


def _tuning_from(record: dict | None):
    if record is None:
        return None
    return Tuning(**{k: _tuples(v) for k, v in record.items()})


def _plan_record(plan) -> dict | None:
    """The plan mode kfx.compile was asked for, and the rates it chose with: with them, compiling
    again chooses the same plan on any machine (no re-calibration)."""
    if plan is None:
        return None
    return {"mode": plan.mode, "rates": None if plan.rates is None else dataclasses.asdict(plan.rates)}


def _plan_options(record: dict | None) -> dict:
    if record is None:
        return {}
    from kfx.passes.plan import Rates

    rates = record["rates"]
    return {"plan": record["mode"], "plan_rates": None if rates is None else Rates(**rates)}


def _tuples(value):
    """Lists back to the tuples a frozen record holds."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def save(engine, path) -> None:
    """Write ``engine``'s compile arguments and its model's fingerprint to ``path`` (atomically)."""
    compiled = engine.compiled
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kfx_version": kfx.__version__,
        "torch_version": str(torch.__version__),
        "model_class": type(engine._model).__name__,
        "arguments": {
            "image_shape": list(compiled.image_shape),
            "patch": _patch_record(compiled.patch),
            "tau": float(compiled.tau),
            "global_context": compiled.global_context,
            "dtype": str(compiled.dtype).removeprefix("torch."),
            "backend": compiled.backend,
            "batch_size": int(compiled.batch_size),
        },
        "tuning": _tuning_record(compiled.tuning),
        "plan": _plan_record(getattr(compiled, "plan", None)),
        "fingerprint": fingerprint(compiled.graph_module),
    }
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a directory; give engine.save a file path, e.g. {path / 'engine.kfx'}")
    if not path.parent.is_dir():
        raise InputError(f"cannot save the engine to {path}: folder {path.parent} does not exist")
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(record, f)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _read(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no engine file at {path}: save one with engine.save(path) first")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise InputError(
            f"{path} is not a kfx engine file, or it is damaged ({type(exc).__name__}); compile the model again "
            "and save it with engine.save"
        ) from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise InputError(f"{path} is not a kfx engine file (saved by engine.save); compile the model again")
    if record.get("format_version") != FORMAT_VERSION or record.get("kfx_version") != kfx.__version__:
        raise InputError(
            f"{path} was saved by kfx {record.get('kfx_version')} (engine format {record.get('format_version')}); "
            f"this is kfx {kfx.__version__} (format {FORMAT_VERSION}), which cannot load it: compile the model "
            "again and save it"
        )
    return record


def _check_expected(arguments: dict, patch: Patch, image_shape, expected_patch, path) -> None:
    """The caller's expectations (optional) against the saved engine's shape and patch."""
    saved_shape = tuple(arguments["image_shape"])
    if image_shape is not None and tuple(int(v) for v in image_shape) != saved_shape:
        raise InputError(
            f"{path} holds an engine for inputs of shape {list(saved_shape)}, not {list(image_shape)}; "
            "compile one for that shape"
        )
    if expected_patch is None:
        return
    if isinstance(expected_patch, int) and not isinstance(expected_patch, bool):
        expected_patch = Patch(expected_patch)
    if not isinstance(expected_patch, Patch):
        raise PatchError(f"patch must be a kfx.Patch or an int, got {type(expected_patch).__name__}")
    expected_patch = expected_patch.for_axes(patch.axes)
    same_fill = _same_fill(expected_patch.fill, patch.fill)
    if expected_patch.size != patch.size or expected_patch.stride != patch.stride or not same_fill:
        raise PatchError(
            f"{path} holds an engine for patch {patch.size} stride {patch.stride} (fill {_fill_text(patch.fill)}), "
            f"not patch {expected_patch.size} stride {expected_patch.stride} (fill "
            f"{_fill_text(expected_patch.fill)}); compile one for that patch"
        )


def _same_fill(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def _fill_text(fill) -> str:
    return f"a {list(fill.shape)} tensor" if isinstance(fill, torch.Tensor) else repr(fill)
