"""Checks of options that need more than one option, the machine or the model (before any long run)."""

from __future__ import annotations

import torch

import kfx
from kfx.cli.common import DEFAULT_PATCH, NEUROMASK_ONLY, OCCLUSION_ONLY, UsageError
from kfx.errors import KfxError

# -- checks that need more than one option ------------------------------------------------------------


def _check_method_options(args) -> None:
    """Options of the other method are mistakes, not something to ignore silently."""
    foreign = NEUROMASK_ONLY if args.method == "occlusion" else OCCLUSION_ONLY
    given = [name for name in foreign if getattr(args, name) is not None]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise UsageError(f"{flags} do(es) not apply to --method {args.method}")


def _approximate_options(args) -> tuple[dict, dict]:
    """``kfx.compile`` and run keyword arguments for --tau / --global-context / --drill-down."""
    compile_options, run_options = {}, {}
    if args.tau is not None:
        compile_options["tau"] = args.tau
    if args.global_context is not None:
        compile_options["global_context"] = args.global_context
    if args.drill_down is not None:
        try:
            run_options["drill_down"] = kfx.DrillDown(**args.drill_down)
        except (KfxError, ValueError, TypeError) as exc:
            settings = ",".join(f"{key}={value}" for key, value in args.drill_down.items())
            raise UsageError(f"--drill-down {settings}: {exc}") from None
    return compile_options, run_options


def _patch(args, size: int) -> kfx.Patch:
    """The patch from --patch/--stride/--fill, checked against the input side."""
    if isinstance(args.fill, tuple) and len(args.fill) != 3:
        raise UsageError(
            f"argument --fill: {len(args.fill)} values given, but images have 3 channels: give one value "
            "or three (R,G,B)"
        )
    size_hw = args.patch if args.patch is not None else DEFAULT_PATCH
    try:
        patch = kfx.Patch(size_hw, stride=args.stride, fill=0.0 if args.fill is None else args.fill)
        patch.check_fits((size, size))
    except KfxError as exc:
        raise UsageError(f"--patch {_pair_text(size_hw)}: {exc} (or a larger --size)") from None
    return patch


def _pair_text(value) -> str:
    return "x".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _load_model(args):
    """The --model / --weights model; --weights with the default model is a usage error (exit 2)."""
    from kfx.models import DEFAULT_MODEL, load_model

    if args.weights is not None and args.model in (None, DEFAULT_MODEL):
        raise UsageError(
            f"--weights applies to --model torchvision:NAME or package.module:factory, not the default "
            f"{DEFAULT_MODEL} (its ImageNet weights are built in)"
        )
    return load_model(args.model, args.weights)


def _device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu")
    return torch.device(choice)


def _check_backend(backend: str | None, device: torch.device) -> str:
    """The --backend choice, refused here (exit 2) when it cannot run on this machine."""
    from kfx import kernels

    backend = backend or "auto"
    try:
        kernels.resolve_backend(backend, device)
    except KfxError as exc:
        raise UsageError(f"--backend {backend}: {exc}") from None
    return backend
