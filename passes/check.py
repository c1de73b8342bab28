"""Pass 1b: check the traced graph against the model it came from (the safety net under every rewrite).

Requires: the eager model and its functional GraphModule (kfx.passes.trace).
Ensures: the graph computes what the model computes on a random batch (else TraceError), and one
image's output depends neither on the other images of its batch nor on the batch size beyond the
model's own rounding (else ModelError): kfx evaluates many patch positions per batch.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from kfx.errors import ModelError, TraceError

__all__ = ["check_traced", "runs_channels_last"]


def _close(a: torch.Tensor, b: torch.Tensor, allowance: float = 0.0) -> bool:
    """Equal up to rounding (batch sizes and fused kernels may sum in another order); NaN equals NaN.

    ``allowance``: a larger absolute difference to accept, the rounding noise a model was measured to
    amplify (:func:`_rounding_noise`).
    """
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.dtype.is_floating_point:
        return torch.equal(a, b)
    finite = b[b.isfinite()]
    scale = max(float(finite.abs().max()) if finite.numel() else 0.0, 1e-3)
    limit = max(_relative_tolerance(a.dtype) * scale, allowance)
    same = (a == b) | (a.isnan() & b.isnan()) | ((a - b).abs() <= limit)
    return bool(same.all())


def _relative_tolerance(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 2e-2)


# _rounding_noise perturbs each op's result by up to one eps relative, the rounding of one op; a
# kernel that sums K terms in another order (another batch size) can round about sqrt(K) times worse,
# with K = 9 * channels in the hundreds. On float32 CNNs that amplify rounding (large offsets that a
# BatchNorm subtracts again, efficientnet_b0 with recalibrated BatchNorm) the difference between
# batch sizes 1 and 2 was at most 2.3 times the measured noise; 16 leaves room for unlucky draws.
_NOISE_MARGIN = 16.0


def _check_output(output, model: nn.Module, batch: int) -> None:
    name = type(model).__name__
    if isinstance(output, (tuple, list, dict)):
        kind = type(output).__name__
        raise ModelError(
            f"{name} returns a {kind}, but kfx explains one tensor of class scores [N, num_classes] (the value "
            "the softmax is taken of). Wrap the model so that forward returns the output to explain, e.g. "
            "a module whose forward(x) returns model(x)[0] or model(x)['logits']"
        )
    if not isinstance(output, torch.Tensor):
        raise ModelError(
            f"{name} returns a {type(output).__name__}, but kfx explains one tensor of class scores "
            "[N, num_classes]; wrap the model so that forward returns that tensor"
        )
    if output.dim() == 0 or output.shape[0] != batch:
        raise ModelError(
            f"{name} returned shape {list(output.shape)} for a batch of {batch} images; kfx needs one row per "
            "image ([N, num_classes] scores, or [N, ...] for engine.outputs). Wrap the model so that forward "
            "keeps the batch dimension"
        )


def check_traced(
    model: nn.Module,
    gm: fx.GraphModule,
    example: torch.Tensor,
    alone: torch.Tensor | None = None,
    *,
    try_channels_last: bool = False,
) -> bool:
    """Check on ``example`` (a batch of at least two images) that ``gm`` computes what ``model`` does.

    The safety net under every graph rewrite: a traced graph that computes another function (an
    in-place op or alias the functionalisation missed, a torch.fx tracing gap) raises TraceError,
    and a model whose outputs depend on the other examples of the batch or on its size raises
    ModelError, since kfx evaluates many patch positions per batch. Inputs are cloned: an eager
    forward may change them.
    ``alone``: ``gm``'s output for ``example[:1]`` if already computed (shape propagation runs it).

    Returns whether the graph also runs channels-last (:func:`runs_channels_last`), asked only with
    ``try_channels_last``: the graph's run on the batch is then tried in that layout first, and
    where it gives the model's outputs and ``alone`` it has passed both checks in one run (compile
    time, issue #19); anywhere else the check runs again contiguous, as without it, and says False.
    """
    try:
        with torch.no_grad():
            eager = model(example.clone())
    except Exception as exc:
        raise ModelError(
            f"the model runs on one image but fails on a batch of {example.shape[0]} images "
            f"({type(exc).__name__}: {exc}); kfx evaluates many patch positions per batch, so forward must "
            "accept any batch size (e.g. x.view(x.size(0), -1) instead of x.view(1, -1))"
        ) from exc
    _check_output(eager, model, example.shape[0])
    if try_channels_last and alone is not None and _channels_last_matches(gm, example, eager, alone):
        return True
    try:
        with torch.no_grad():
            traced = gm(example.clone())
            if alone is None:
                alone = gm(example[:1].clone())
    except Exception as exc:
        raise TraceError(
            f"the traced graph of {type(model).__name__} fails where the model runs: {type(exc).__name__}: {exc}"
        ) from exc
    if not _close(traced, eager):
        _check_deterministic(model, example, eager)
        difference = (
            (traced.double() - eager.double()).abs().max() if traced.shape == eager.shape else "shape"
        )
        raise TraceError(
            f"the torch.fx graph of {type(model).__name__} computes something other than the model (largest "
            f"difference {difference} on a random batch), so kfx's maps would be wrong. This happens with "
            "in-place ops on views or on tensors used again later (write them out of place and retry), "
            "and with forward hooks on the model itself, which torch.fx does not record (remove them, or "
            "compile a module whose forward calls the hooked model)"
        )
    if not _close(alone, traced[:1]):
        _check_per_example(type(model).__name__, gm, example, traced, alone)
    return False


def runs_channels_last(gm: fx.GraphModule, image: torch.Tensor, alone: torch.Tensor) -> bool:
    """Whether ``gm`` runs on ``image`` (a batch of one 2-d image) in the channels-last layout and
    gives ``alone`` (its output on ``image`` as it is) up to rounding: then kfx runs the 2-d CPU
    program in that layout (docs/design.md §3.6). A graph that views a map as another shape
    (``x.view(n, -1)`` on a spatial map) fails there, and keeps the contiguous layout. kfx.load
    asks this; kfx.compile learns it from :func:`check_traced`'s run."""
    out = _run_channels_last(gm, image)
    return out is not None and isinstance(alone, torch.Tensor) and _close(out, alone)


def _channels_last_matches(gm: fx.GraphModule, example, eager, alone) -> bool:
    """``gm`` on the batch ``example`` in the channels-last layout gives the eager model's outputs
    ``eager`` (so the graph computes the model), and its first image's output matches ``alone``
    (its output on that image alone, contiguous: the layout and the batch change nothing)."""
    out = _run_channels_last(gm, example)
    return out is not None and _close(out, eager) and _close(alone, out[:1])


def _run_channels_last(gm: fx.GraphModule, images: torch.Tensor) -> torch.Tensor | None:
    """``gm``'s output on ``images`` (2-d, CPU, floating point) converted to channels-last, or None
    where it cannot say: another input, a failure (only meaning: not in this layout), not a tensor."""
    if images.dim() != 4 or images.device.type != "cpu" or not images.dtype.is_floating_point:
        return None
    try:
        with torch.no_grad():
            out = gm(images.contiguous(memory_format=torch.channels_last))
    except Exception:  # any failure only means: not in this layout
        return None
    return out if isinstance(out, torch.Tensor) else None


def _check_deterministic(model: nn.Module, example: torch.Tensor, eager: torch.Tensor) -> None:
    """A model whose output changes from one call to the next (dropout with ``training=True``, noise
    from ``torch.rand``) gives each position other randomness: no map of it can be exact."""
    with torch.no_grad():
        again = model(example.clone())
    if not _close(again, eager):
        raise ModelError(
            f"{type(model).__name__} gives different outputs for the same images on two calls (random ops in "
            "forward, such as F.dropout(..., training=True) or noise from torch.rand, or state that forward "
            "updates, such as a call counter), so its occlusion map would depend on chance or on history; "
            "make forward deterministic in eval mode and retry"
        )


def _check_per_example(name: str, gm: fx.GraphModule, example, traced, alone) -> None:
    """Tell rounding from batch dependence when the first image's output differs at batch sizes 1 and 2.

    Kernels sum in another order at another batch size, and a model that amplifies rounding (a large
    offset that a BatchNorm subtracts again, a deep random-weight network) can make that differ by
    far more than the dtype's tolerance though each output depends on its own image only. At one
    batch size the kernels are the same: the first image's output must not change when the other
    images do, or the model mixes the examples of a batch. The difference across batch sizes must
    then be rounding, no larger than the model's own rounding noise, or the output depends on the
    batch size.
    """
    others = example.clone()
    generator = torch.Generator().manual_seed(1)
    others[1:] = torch.randn(others[1:].shape, generator=generator, dtype=torch.float64).to(others)
    with torch.no_grad():
        first = gm(others)[:1]
    if not _close(first, traced[:1]):
        raise ModelError(
            f"{name}'s output for an image depends on the other images in its batch (an op mixes the "
            "examples of a batch, e.g. batch statistics or a mean over dim 0); kfx evaluates many "
            "patch positions per batch, so its maps would be wrong. Make the model's forward per example"
        )
    noise = _rounding_noise(gm, example, traced)
    if not _close(alone, traced[:1], _NOISE_MARGIN * noise):
        difference = float((alone.double() - traced[:1].double()).abs().max())
        raise ModelError(
            f"{name}'s output for an image depends on the batch size (largest difference {difference:.3g} "
            f"between batches of 1 and {example.shape[0]} images; rounding explains at most "
            f"{_NOISE_MARGIN * noise:.3g}); kfx evaluates many patch positions per batch, so its maps "
            "would be wrong. Make the model's forward independent of x.shape[0]"
        )


def _rounding_noise(gm: fx.GraphModule, example: torch.Tensor, output: torch.Tensor) -> float:
    """How far ``gm``'s ``output`` on ``example`` moves when every intermediate value moves by an ulp.

    Monte Carlo arithmetic: rounding changes each op's result by about an ulp of it, so perturbing
    every result by a random fraction of eps and rerunning shows how much the model amplifies
    rounding. The batch is ``example``'s, so that a dependence on the batch size cannot hide in the
    measurement.
    """
    if not example.dtype.is_floating_point:
        return 0.0
    with torch.no_grad():
        moved = _Perturbed(gm, torch.finfo(example.dtype).eps).run(example.clone())
    deviation = (moved.double() - output.double()).abs()
    finite = deviation[deviation.isfinite()]
    return float(finite.max()) if finite.numel() else 0.0


class _Perturbed(fx.Interpreter):
    """Runs the graph with every floating-point result r replaced by r * (1 + relative * u), u uniform
    in [-1, 1] from a fixed seed."""

    def __init__(self, gm: fx.GraphModule, relative: float):
        super().__init__(gm)
        self.relative = relative
        self.generator = torch.Generator().manual_seed(2)

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        if n.op == "get_attr" or not isinstance(result, torch.Tensor) or not result.is_floating_point():
            return result
        noise = torch.rand(result.shape, generator=self.generator, dtype=result.dtype) * 2 - 1
        return result * (1 + self.relative * noise.to(result.device))
