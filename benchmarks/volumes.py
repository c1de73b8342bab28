"""3-D volumes and 1-D signals (issue #17): kfx exact vs batched full inference, MONAI's
OcclusionSensitivity and Captum's Occlusion, side by side in one run.

3-D: MONAI's DenseNet121 and ResNet18 (``spatial_dims=3``, one input channel, two classes, random
weights: speed does not depend on them) on a synthetic volume (smooth noise plus a bright ellipsoid)
of --sides voxels a side, a 16^3 mask, MONAI's window placement at --overlaps (0.6 is MONAI's
default: a stride of round(16 * 0.4) = 6 voxels; 0.8 gives 3). In this one process:

  full    batched full inference on occluded copies (kfx.NaiveEngine), best of --batch-sizes;
  kfx     the exact engine (engine.outputs) on the same positions, best batch size, the unoccluded
          volume's base inference included in every timed run;
  monai   ``monai.visualize.OcclusionSensitivity`` with the same mask, overlap and n_batch, on the
          whole volume, where --monai-budget seconds (estimated from the full-inference rate)
          allow; otherwise the row says so and MONAI's time is not claimed.

A full map has thousands of windows (18^3 = 5832 at 128^3, overlap 0.6), so full and kfx are timed
on --positions random window corners (the same for both) and scaled by the window count: the cost of
a position does not depend on where it is (the box is uniform). kfx's map time adds its one base
inference of the unoccluded volume (timed separately). ``ceiling`` is
``engine.cost().theoretical_speedup`` (per position); ``realized`` the measured per-position
speedup over it.

1-D: MONAI's ResNet18 (``spatial_dims=1``, 12 leads, 5 classes) on length-5000 signals, patch 250,
stride 50 (96 windows, the whole grid): kfx vs batched full inference vs ``captum.attr.Occlusion``
(sliding window (12, 250), strides (12, 50), perturbations_per_eval = batch size).

Each time is the best of --repeats runs. Results: JSON and Markdown in benchmarks/results/ with the
machine, torch, threads, commit and command. Never run by the tests.

Two more measurements, run alone when asked for (results in <tag>_tau and <tag>_memory):

  --tau     each model with its last layer fitted as a linear probe on synthetic volumes (a bright or
            a dark ball: a map that means something), tau tuned with kfx.tune (SSIM >= 0.9 against
            the exact map), then whole maps at overlap 0.6 on held-out volumes: kfx exact and kfx at
            that tau (their SSIM), vs MONAI's OcclusionSensitivity timed on a b_box subset of its
            windows and scaled by the window count, or with --monai-windows 0 on the whole volume
            (one time each: single runs, not best-of).
  --memory  peak RSS growth (VmHWM) of one kfx.monai.OcclusionSensitivity call (exact) vs one of
            MONAI's at the same n_batch, each in a fresh process, --memory-repeats times, with glibc's
            malloc as it is and with a fixed mmap threshold (RSS then follows the live tensors).

    python benchmarks/volumes.py                                   # everything (long on 2 cores)
    python benchmarks/volumes.py --sides 64 --overlaps 0.6 --positions 8 --repeats 1 --tag volumes_quick
    python benchmarks/volumes.py --tau --memory --memory-configs 64:16 128:4
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np
import torch
from compare import RESULTS, best_time, machine  # benchmarks/ is on sys.path

import kfx

MASK = 16


def volume(side: int) -> torch.Tensor:
    """[1, D, H, W]: smooth noise plus a bright ellipsoid off the centre (something to find)."""
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 1, side // 8, side // 8, side // 8, generator=generator)
    smooth = torch.nn.functional.interpolate(noise, size=(side,) * 3, mode="trilinear")[0]
    axis = torch.linspace(-1, 1, side)
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    blob = (((z - 0.3) / 0.25) ** 2 + ((y + 0.2) / 0.3) ** 2 + (x / 0.2) ** 2 < 1).float()
    return smooth + 2 * blob[None]


def network(name: str, axes: int) -> torch.nn.Module:
    from monai.networks import nets

    torch.manual_seed(0)
    if name == "densenet121":
        return nets.DenseNet121(spatial_dims=axes, in_channels=1, out_channels=2).eval()
    if axes == 1:
        return nets.resnet18(spatial_dims=1, n_input_channels=12, num_classes=5).eval()
    return nets.resnet18(spatial_dims=axes, n_input_channels=1, num_classes=2).eval()


def window_corners(
    side: int, stride: int, count: int, axes: int, size: int = MASK
) -> tuple[torch.Tensor, int]:
    """``count`` random corners of the grid of windows of ``size`` (all of them if count is 0) and
    the grid's size."""
    per_axis = (side - size) // stride + 1
    total = per_axis**axes
    generator = torch.Generator().manual_seed(1)
    cells = torch.randperm(total, generator=generator)[: count or total]
    corners = torch.stack([(cells // per_axis ** (axes - 1 - a)) % per_axis for a in range(axes)], 1) * stride
    return corners, total


def full_outputs(model, x, positions, patch, batch_size):
    return kfx.NaiveEngine(model, tuple(x.shape), patch, batch_size=batch_size).outputs(x, positions)


def kfx_outputs(engine, x, positions, batch_size):
    """The positions alone: the unoccluded volume's base inference is cached by a first call and
    timed once per map separately (a map runs it once, whatever its window count)."""
    return engine.outputs(x, positions, batch_size=batch_size)


def kfx_map(engine, x, positions, batch_size):
    """A whole map as a first call computes it: the base inference, then every position."""
    engine._base_cache = None
    return engine.outputs(x, positions, batch_size=batch_size)


def base_seconds(engine, x, repeats: int) -> float:
    def base():
        engine._base_cache = None
        engine.outputs(x, torch.zeros((0, x.dim() - 1), dtype=torch.long))

    return best_time(base, repeats)


def run_volume(name: str, side: int, args) -> list[dict]:
    """One row per overlap. A position costs the same whatever the stride (the changed box depends
    on the mask only), so positions are timed once, at the first overlap's grid, and each overlap's
    map time is that cost times its window count."""
    model = network(name, 3)
    x = volume(side)
    patch = kfx.Patch(MASK, stride=max(1, round(MASK * (1 - args.overlaps[0]))))
    started = time.perf_counter()
    engine = kfx.compile(model, tuple(x.shape), patch)
    compile_s = time.perf_counter() - started
    positions, _ = window_corners(side, patch.stride[0], args.positions, 3)
    t_base = base_seconds(engine, x, args.repeats)
    kfx_outputs(engine, x, positions[:1], 1)  # the base activations, cached for the timed runs
    rows = []
    for batch in args.batch_sizes:
        t_full = best_time(lambda b=batch: full_outputs(model, x, positions, patch, b), args.repeats)
        t_kfx = best_time(lambda b=batch: kfx_outputs(engine, x, positions, b), args.repeats)
        rows.append({"batch_size": batch, "full_s": round(t_full, 3), "kfx_s": round(t_kfx, 3)})
    check = kfx_outputs(engine, x, positions[:2], 2)
    with torch.no_grad():
        expected = model(kfx.occlude(x, positions[:2], patch))
    error = ((check - expected).abs().max() / expected.abs().max()).item()
    best_full, best_kfx = min(r["full_s"] for r in rows), min(r["kfx_s"] for r in rows)
    per_window_full, per_window_kfx = best_full / len(positions), best_kfx / len(positions)
    ceiling = engine.cost().theoretical_speedup
    results = []
    for overlap in args.overlaps:
        stride = max(1, round(MASK * (1 - overlap)))
        windows = ((side - MASK) // stride + 1) ** 3
        result = {
            "model": name,
            "side": side,
            "overlap": overlap,
            "stride": stride,
            "windows": windows,
            "timed_positions": len(positions),
            "rows": rows,
            "base_s": round(t_base, 2),
            "full_map_s_estimated": round(per_window_full * windows, 1),
            "kfx_map_s_estimated": round(t_base + per_window_kfx * windows, 1),
            "speedup_per_position": round(best_full / best_kfx, 2),
            "ceiling": round(ceiling, 2),
            "realized": round(best_full / best_kfx / ceiling, 2),
            "compile_s": round(compile_s, 1),
            "max_relative_error": error,
        }
        result["speedup_vs_full"] = round(result["full_map_s_estimated"] / result["kfx_map_s_estimated"], 2)
        if per_window_full * windows <= args.monai_budget:
            result["monai_s"] = round(time_monai(model, x, overlap, max(args.batch_sizes)), 1)
            result["speedup_vs_monai"] = round(result["monai_s"] / result["kfx_map_s_estimated"], 2)
        else:
            result["monai_s"] = None  # not run: its estimated time is over --monai-budget
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


def time_monai(model, x, overlap: float, n_batch: int) -> float:
    from monai.visualize import OcclusionSensitivity

    occlusion = OcclusionSensitivity(model, mask_size=MASK, n_batch=n_batch, overlap=overlap, mode=0.0)
    started = time.perf_counter()
    with torch.no_grad():
        occlusion(x[None])
    return time.perf_counter() - started


def run_signal(args) -> dict:
    from captum.attr import Occlusion

    model = network("resnet18", 1)
    generator = torch.Generator().manual_seed(2)
    x = torch.cumsum(torch.randn(12, 5000, generator=generator), dim=1) / 50
    patch = kfx.Patch(250, stride=50)
    engine = kfx.compile(model, (12, 5000), patch)
    positions, windows = window_corners(5000, 50, 0, 1, size=250)
    target = int(model(x[None]).argmax())
    rows = []
    for batch in args.batch_sizes:
        t_full = best_time(lambda b=batch: full_outputs(model, x, positions, patch, b), args.repeats)
        t_kfx = best_time(lambda b=batch: kfx_map(engine, x, positions, b), args.repeats)

        def captum(b=batch):
            with torch.no_grad():
                Occlusion(model).attribute(
                    x[None],
                    sliding_window_shapes=(12, 250),
                    strides=(12, 50),
                    baselines=0.0,
                    target=target,
                    perturbations_per_eval=b,
                )

        t_captum = best_time(captum, args.repeats)
        rows.append(
            {
                "batch_size": batch,
                "full_s": round(t_full, 3),
                "kfx_s": round(t_kfx, 3),
                "captum_s": round(t_captum, 3),
            }
        )
    best = {key: min(r[key] for r in rows) for key in ("full_s", "kfx_s", "captum_s")}
    return {
        "model": "resnet18 (1-D, MONAI)",
        "length": 5000,
        "windows": windows,
        "rows": rows,
        "speedup_vs_full": round(best["full_s"] / best["kfx_s"], 2),  # kfx includes its base inference
        "speedup_vs_captum": round(best["captum_s"] / best["kfx_s"], 2),
        "ceiling": round(engine.cost().theoretical_speedup, 2),
    }


# -- --tau: a small trained model, kfx.tune, then kfx at the tuned tau vs MONAI ---------------------
N_BATCH = 16  # MONAI's default n_batch; kfx's batch size in these comparisons too
OVERLAP = 0.6  # MONAI's default: windows every int(16 * 0.4) = 6 voxels, 9 per axis at 64^3


def blob_volume(side: int, bright: bool, generator: torch.Generator) -> torch.Tensor:
    """[1, D, H, W]: smooth noise plus a ball, bright (+1) or dark (-1), somewhere; the class is its
    sign. Sizes are relative, so any side draws the same scene. (Not "which half": a network that
    ends in global pooling can tell that only from its padding.)"""
    noise = torch.randn(1, 1, 4, 4, 4, generator=generator)
    smooth = 0.2 * torch.nn.functional.interpolate(noise, size=(side,) * 3, mode="trilinear")[0]
    u = torch.rand(4, generator=generator)
    centre, radius = 1.2 * u[:3] - 0.6, 0.2 + 0.2 * u[3]
    axis = torch.linspace(-1, 1, side)
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    ball = ((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 < radius**2).float()
    return smooth + (1 if bright else -1) * ball[None]


def blob_batch(side: int, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` volumes [N, 1, D, H, W], alternating classes, and their labels."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 2
    return torch.stack([blob_volume(side, bool(label), generator) for label in labels]), labels


def trained_network(name: str, args) -> tuple[torch.nn.Module, float, float]:
    """``network(name, 3)`` with its last linear layer fitted (logistic regression, L-BFGS) on the
    pooled features of --train-volumes blob volumes of --side voxels; the convolutions keep their
    random weights. A linear probe, not end-to-end training: on 2 shared cores a few SGD steps of a
    3-D ResNet18 take minutes and did not learn the task. Returns the model, its accuracy on 16
    held-out volumes and the seconds taken."""
    model = network(name, 3)
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    started = time.perf_counter()
    x, y = blob_batch(args.side, args.train_volumes, seed=1000)
    features = pooled_features(model, head, x)
    mean, std = features.mean(0), features.std(0) + 1e-6
    weight, bias = logistic_regression((features - mean) / std, y, classes=head.out_features)
    with torch.no_grad():  # standardisation folded into the layer
        head.weight.copy_(weight / std)
        head.bias.copy_(bias - (weight * mean / std).sum(1))
    train_s = time.perf_counter() - started
    x, y = blob_batch(args.side, 16, seed=99)
    with torch.no_grad():
        accuracy = (torch.cat([model(part).argmax(1) for part in x.split(8)]) == y).float().mean().item()
    return model, accuracy, train_s


def pooled_features(model, head, x) -> torch.Tensor:
    """What ``head`` (the last linear layer) sees for each volume of ``x``."""
    features = []
    hook = head.register_forward_hook(lambda module, inputs, output: features.append(inputs[0]))
    try:
        with torch.no_grad():
            for part in x.split(8):
                model(part)
    finally:
        hook.remove()
    return torch.cat(features)


def logistic_regression(z, y, classes: int, decay: float = 1e-2):
    weight = torch.zeros(classes, z.shape[1], requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, bias], max_iter=200)

    def loss():
        optimiser.zero_grad()
        value = torch.nn.functional.cross_entropy(z @ weight.T + bias, y) + decay * weight.square().sum()
        value.backward()
        return value

    optimiser.step(loss)
    return weight.detach(), bias.detach()


def monai_seconds_per_window(model, x, windows_wanted: int) -> tuple[float, int]:
    """MONAI's OcclusionSensitivity (mode 0.0, N_BATCH, OVERLAP) on a b_box holding at least
    ``windows_wanted`` windows: seconds per window and the window count (counted by a forward hook,
    one row per occluded copy). MONAI's cost is one full forward pass per window, wherever it is."""
    from monai.visualize import OcclusionSensitivity

    rows = []
    hook = model.register_forward_hook(lambda module, inputs, output: rows.append(len(output)))
    try:
        occlusion = OcclusionSensitivity(
            model, mask_size=MASK, n_batch=N_BATCH, overlap=OVERLAP, mode=0.0, verbose=False
        )
        b_box = monai_b_box(x.shape[-1], windows_wanted)
        started = time.perf_counter()
        with torch.no_grad():
            occlusion(x[None], b_box=b_box)
        seconds = time.perf_counter() - started
    finally:
        hook.remove()
    return seconds / sum(rows), sum(rows)


def monai_b_box(side: int, windows_wanted: int) -> list[int]:
    """The smallest cube b_box [0, h] per axis (h >= 9, so that the mask is not clipped) whose MONAI grid holds at least ``windows_wanted``
    windows (kfx.monai's copy of MONAI's crop and placement, checked against MONAI by its tests)."""
    from kfx.monai import _axis_starts, _crop

    for high in range(side):
        crop = _crop([0, high] * 3, (side,) * 3, (MASK,) * 3)
        if crop.mask != (MASK,) * 3:
            continue  # a region under the mask: MONAI would shrink the mask
        count = math.prod(len(_axis_starts(stop - start, MASK, OVERLAP)) for start, stop in crop.region)
        if count >= windows_wanted:
            return [0, high] * 3
    return [-1, -1] * 3


def interleaved_per_window(model, exact, fast, x, args) -> dict[str, float]:
    """Seconds per window of MONAI (a b_box subset), kfx exact and kfx tau (the same random windows,
    base activations cached), and each engine's base inference: --timing-rounds rounds, the three
    methods one after another in each, best of the rounds for each. Interleaving puts all three
    under the same load of a machine shared with other jobs."""
    corners, _ = window_corners(x.shape[-1], exact.patch.stride[0], args.monai_windows or 64, x.dim() - 1)
    best: dict[str, float] = {}
    for _ in range(args.timing_rounds):
        times = {
            "base_exact": base_seconds(exact, x, 1),
            "base_tau": base_seconds(fast, x, 1),
            "exact": best_time(lambda: exact.outputs(x, corners, batch_size=N_BATCH), 1) / len(corners),
            "tau": best_time(lambda: fast.outputs(x, corners, batch_size=N_BATCH), 1) / len(corners),
        }
        if args.monai_windows:
            times["monai"] = monai_seconds_per_window(model, x, args.monai_windows)[0]
        best = {k: min(v, best.get(k, v)) for k, v in times.items()}
        print(f"  per-window round: { {k: round(v, 4) for k, v in times.items()} }", flush=True)
    return best


def timed_map(engine, x) -> tuple[kfx.Heatmap, float]:
    """A whole map as a first call computes it (the base inference included), and its seconds."""
    engine._base_cache = None
    started = time.perf_counter()
    heatmap = engine(x, batch_size=N_BATCH)
    return heatmap, time.perf_counter() - started


def run_tau(name: str, args) -> dict:
    """Train, tune tau on --tune-samples volumes, then on each of --held-out other volumes: the
    exact map and the tuned map (SSIM between them), timed; MONAI timed on a subset of its windows
    on the first held-out volume and scaled by its window count."""
    model, accuracy, train_s = trained_network(name, args)
    shape = (1, args.side, args.side, args.side)
    samples, _ = blob_batch(args.side, args.tune_samples, seed=7)
    tune_patch = kfx.Patch(MASK, stride=args.tune_stride)
    started = time.perf_counter()
    tuned = kfx.tune(model, shape, tune_patch, list(samples), 0.9, taus=args.taus, batch_size=N_BATCH)
    tune_s = time.perf_counter() - started
    tau = tuned.tau
    stride = max(1, int(MASK * (1 - OVERLAP)))  # = MONAI's window starts when (side - 16) % 6 == 0
    patch = kfx.Patch(MASK, stride=stride)
    exact = kfx.compile(model, shape, patch, batch_size=N_BATCH)
    fast = kfx.compile(model, shape, patch, batch_size=N_BATCH, tau=tau)
    volumes, _ = blob_batch(args.side, args.held_out, seed=11)
    per_volume = []
    for volume_ in volumes:
        exact_map, exact_s = timed_map(exact, volume_)
        fast_map, fast_s = timed_map(fast, volume_)
        ssim = kfx.heatmap_ssim(exact_map, fast_map)
        per_volume.append({"exact_s": round(exact_s, 1), "tau_s": round(fast_s, 1), "ssim": round(ssim, 4)})
        print(f"  {name} held-out: {per_volume[-1]}", flush=True)
    windows = exact_map.values.numel()
    timing = interleaved_per_window(model, exact, fast, volumes[0], args)
    if args.monai_windows:  # a b_box subset, scaled: MONAI's overhead outside the box is not counted
        monai_s = timing["monai"] * windows
    else:  # the whole volume, as users call it
        monai_s = time_monai(model, volumes[0], OVERLAP, N_BATCH)
    monai_windows = args.monai_windows or windows
    kfx_exact_s = timing["base_exact"] + timing["exact"] * windows
    kfx_tau_s = timing["base_tau"] + timing["tau"] * windows
    result = {
        "model": name,
        "side": args.side,
        "overlap": OVERLAP,
        "stride": stride,
        "n_batch": N_BATCH,
        "windows": windows,
        "probe": {"volumes": args.train_volumes, "seconds": round(train_s, 1), "held_out_accuracy": accuracy},
        "tune": {
            "samples": args.tune_samples,
            "stride": args.tune_stride,
            "taus": list(args.taus),
            "seconds": round(tune_s, 1),
            "lower_ssim": [round(v, 4) for v in tuned.tuning.lower],
            "mean_ssim": [round(v, 4) for v in tuned.tuning.mean],
        },
        "tau": tau,
        "ceiling_exact": round(exact.cost().theoretical_speedup, 2),
        "ceiling_tau": round(fast.cost().theoretical_speedup, 2),
        "held_out": per_volume,
        "min_held_out_ssim": min(v["ssim"] for v in per_volume),
        "monai_timed_windows": monai_windows,
        "monai_s_estimated": round(monai_s, 1),
        "timing_rounds": args.timing_rounds,
        "per_window_s_best": {k: round(v, 4) for k, v in timing.items()},
        "kfx_exact_s": round(kfx_exact_s, 1),
        "kfx_tau_s": round(kfx_tau_s, 1),
    }
    result["tau_speedup_vs_monai"] = round(monai_s / result["kfx_tau_s"], 2)
    result["exact_speedup_vs_monai"] = round(monai_s / result["kfx_exact_s"], 2)
    result["goal_5x_met"] = result["tau_speedup_vs_monai"] >= 5 and result["min_held_out_ssim"] >= 0.9
    print(json.dumps(result), flush=True)
    return result


# -- --memory: peak resident memory of one occlusion call, kfx exact vs MONAI, fresh processes -------
def memory_child(name: str, side: int, method: str, n_batch: int, windows_wanted: int, threads: int, queue):
    try:
        queue.put(measure_memory(name, side, method, n_batch, windows_wanted, threads))
    except BaseException as exc:  # report, so the parent never waits forever on a dead child
        queue.put(f"{type(exc).__name__}: {exc}")


def measure_memory(
    name: str, side: int, method: str, n_batch: int, windows_wanted: int, threads: int
) -> dict:
    """Peak RSS growth (MiB) of one call of kfx.monai.OcclusionSensitivity (exact, batch_size =
    n_batch) or MONAI's, mode 0.0, on a b_box holding >= windows_wanted windows. A first call on a
    one-window b_box warms both up (kfx compiles its engine there, and its cached base activations
    are then dropped so the measured call computes them again, as a first call would); freed heap
    is returned to the system (malloc_trim) before the baseline is read."""
    import ctypes
    import warnings

    from compare import _reset_peak_rss, _rss_mib
    from monai.visualize import OcclusionSensitivity as MonaiOcclusion

    import kfx.monai

    warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing")
    torch.set_num_threads(threads)
    model = network(name, 3)
    x = volume(side)[None]
    options = dict(mask_size=MASK, n_batch=n_batch, overlap=OVERLAP, mode=0.0, verbose=False)
    if method == "kfx":
        occlusion = kfx.monai.OcclusionSensitivity(model, batch_size=n_batch, **options)
    else:
        occlusion = MonaiOcclusion(model, **options)
    with torch.no_grad():
        occlusion(x, b_box=monai_b_box(side, 1))
    for engine in getattr(occlusion, "_engines", {}).values():
        engine._base_cache = None
    process_peak = _rss_mib("VmHWM")
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    sampler = RssSampler()
    _reset_peak_rss()
    before = _rss_mib()
    b_box = monai_b_box(side, windows_wanted)
    started = time.perf_counter()
    with sampler, torch.no_grad():
        occlusion(x, b_box=b_box)
    seconds = time.perf_counter() - started
    if method == "kfx" and occlusion.last_fallback_reason is not None:
        raise RuntimeError(f"kfx fell back to MONAI: {occlusion.last_fallback_reason}")
    return {
        "model": name,
        "side": side,
        "method": method,
        "n_batch": n_batch,
        "b_box": b_box,
        "baseline_rss_mib": round(before, 1),
        "peak_growth_mib": round(_rss_mib("VmHWM") - before, 1),
        "sampled_peak_growth_mib": round(sampler.peak - before, 1),
        "process_peak_before_call_mib": round(process_peak, 1),
        "call_s": round(seconds, 1),
    }


class RssSampler:
    """A thread reading this process's RSS (/proc/self/statm) every millisecond while active: a
    cross-check of the kernel's high-water mark VmHWM, blind to peaks shorter than a sample."""

    def __init__(self, interval: float = 0.001):
        import os
        import threading

        self.interval, self.peak = interval, 0.0
        self._page_mib = os.sysconf("SC_PAGE_SIZE") / 2**20
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        with open("/proc/self/statm") as statm:
            while not self._stop.is_set():
                statm.seek(0)
                self.peak = max(self.peak, int(statm.read().split()[1]) * self._page_mib)
                self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


ALLOCATORS = {
    # glibc's own malloc, as users run it: freed blocks under its (rising) mmap threshold stay in
    # the heap and count in RSS until reused
    "glibc": None,
    # blocks of 128 KiB or more mmapped and unmapped on free: RSS follows the live tensors
    "fixed-mmap": "131072",
}


def run_memory(name: str, side: int, n_batch: int, args) -> list[dict]:
    """kfx and MONAI, alternating, each call in a fresh spawned process, --memory-repeats times per
    allocator setting (MALLOC_MMAP_THRESHOLD_ is read by glibc when the child starts)."""
    import multiprocessing as mp
    import os

    rows, ctx, windows = [], mp.get_context("spawn"), args.memory_windows * n_batch
    for allocator in args.allocators:
        for repeat in range(args.memory_repeats):
            for method in ("kfx", "monai"):
                queue = ctx.Queue()
                process = ctx.Process(
                    target=memory_child,
                    args=(name, side, method, n_batch, windows, torch.get_num_threads(), queue),
                )
                threshold = ALLOCATORS[allocator]
                if threshold is not None:
                    os.environ["MALLOC_MMAP_THRESHOLD_"] = threshold
                try:
                    process.start()
                finally:
                    os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
                value = queue.get()
                process.join()
                if isinstance(value, str):
                    raise RuntimeError(
                        f"peak memory of {method} on {name} at {side}^3 failed in the child: {value}"
                    )
                value.update(allocator=allocator, repeat=repeat)
                print(json.dumps(value), flush=True)
                rows.append(value)
    return rows


def memory_summary(rows: list[dict]) -> list[dict]:
    """Per model, side, n_batch and allocator: each method's median, lowest and highest peak growth."""
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for row in rows:
        key = (row["model"], row["side"], row["n_batch"], row["allocator"])
        groups.setdefault(key, {}).setdefault(row["method"], []).append(row)
    out = []
    for (model, side, n_batch, allocator), by in groups.items():
        entry = {"model": model, "side": side, "n_batch": n_batch, "allocator": allocator}
        for method, runs in by.items():
            peaks = [r["peak_growth_mib"] for r in runs]
            entry[method] = {"median": float(np.median(peaks)), "min": min(peaks), "max": max(peaks),
                             "runs": len(peaks), "median_call_s": float(np.median([r["call_s"] for r in runs]))}  # fmt: skip
            entry["b_box"] = runs[0]["b_box"]
        if "kfx" in entry and "monai" in entry:
            entry["ratio_of_medians"] = entry["kfx"]["median"] / entry["monai"]["median"]
            entry["goal_met"] = entry["kfx"]["median"] <= entry["monai"]["median"]
            entry["worst_met"] = entry["kfx"]["max"] <= entry["monai"]["max"]
        out.append(entry)
    return out


def markdown(volumes: list[dict], signal: dict | None, args, info: dict) -> str:
    lines = [
        "# Volumes and signals: kfx exact vs batched full inference, MONAI and Captum",
        "",
        f"Machine: {info['processor']}, {info['cpus']} CPUs, torch {info['torch']}, {info['threads']} threads, "
        f"commit {info['commit']}. Command: `{info['command']}`. Best of {args.repeats} per batch size "
        f"({', '.join(map(str, args.batch_sizes))}), best batch size of each method.",
        "",
        f"3-D: mask {MASK}, {args.positions or 'all'} random windows timed per row and scaled by the window count "
        "(estimated map times); MONAI timed on the whole volume only where its estimate fits the budget.",
        "",
        "| model | side | overlap (stride) | windows | kfx vs full | ceiling | realized | est. full map s "
        "| est. kfx map s | MONAI s | kfx vs MONAI | compile s | max rel. error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in volumes:
        monai = "not run (budget)" if r["monai_s"] is None else f"{r['monai_s']:.1f}"
        versus = f"{r['speedup_vs_monai']:.2f}x" if r["monai_s"] is not None else "-"
        lines.append(
            f"| {r['model']} | {r['side']} | {r['overlap']} ({r['stride']}) | {r['windows']} | "
            f"{r['speedup_vs_full']:.2f}x | {r['ceiling']:.2f} | {r['realized']:.2f} | {r['full_map_s_estimated']} "
            f"| {r['kfx_map_s_estimated']} | {monai} | {versus} | {r['compile_s']} | {r['max_relative_error']:.1e} |"
        )
    if signal:
        lines += [
            "",
            f"1-D: {signal['model']}, 12 x {signal['length']}, patch 250, stride 50, all {signal['windows']} "
            f"windows: kfx {signal['speedup_vs_full']:.2f}x over batched full inference, "
            f"{signal['speedup_vs_captum']:.2f}x over Captum's Occlusion (static ceiling {signal['ceiling']:.2f}).",
        ]
    return "\n".join(lines) + "\n"


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def header(title: str, info: dict, loads: tuple[str, str]) -> list[str]:
    return [
        f"# {title}",
        "",
        f"Machine: {info['processor']}, {info['cpus']} CPUs (shared with other jobs), torch {info['torch']}, "
        f"{info['threads']} threads, commit {info['commit']} plus the working tree. Command: `{info['command']}`. "
        f"Load average (1, 5, 15 min) at start {loads[0]}, at end {loads[1]}: other jobs ran on the same 2 "
        "cores, so wall times are noisy and slower than on an idle machine.",
        "",
    ]


def tau_markdown(results: list[dict], args, info: dict, loads) -> str:
    lines = header("3-D occlusion with a tuned tau: kfx vs MONAI's OcclusionSensitivity", info, loads) + [
        f"Models: MONAI's networks (`spatial_dims=3`, 1 channel, 2 classes) with random convolutions and the "
        f"last linear layer fitted as a probe on {args.train_volumes} synthetic volumes (smooth noise plus a "
        f"bright or dark ball; class = its sign; held-out accuracy in the table). Volumes {args.side}^3, mask "
        f"{MASK}, overlap {OVERLAP} (stride 6, MONAI's windows), fill 0.0, n_batch = kfx batch size = {N_BATCH}.",
        "",
        f"tau: `kfx.tune(target_ssim=0.9, taus={tuple(args.taus)})` on {args.tune_samples} volumes, on maps of "
        f"stride {args.tune_stride} (fewer windows, to save time; the maps compared below are stride 6). "
        f"Held-out: {args.held_out} other volumes, exact and tuned maps at stride 6 (SSIM = "
        "`kfx.heatmap_ssim`, data range = the exact map's range). Times are whole maps on the first held-out "
        "volume, estimated from seconds per window: "
        f"{args.timing_rounds} rounds, each timing MONAI, kfx exact and kfx tau one after another, best "
        "of the rounds for each (interleaved, so all three see the same load). kfx: the engine's base "
        f"inference plus {args.monai_windows or 64} random windows (scaled by the window count). MONAI: "
        + (
            f"a b_box subset of >= {args.monai_windows} of its windows (one full forward pass "
            "each, whatever the window), scaled by the window count."
            if args.monai_windows
            else "one call on the whole first held-out volume, as users run it (every window)."
        ),
        "",
        "| model | probe acc. | tau | held-out SSIM | ceiling exact / tau | MONAI windows timed | MONAI s (est. if a subset) "
        "| kfx exact s | kfx tau s | exact vs MONAI | tau vs MONAI | goal 5x at SSIM >= 0.9 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ssims = ", ".join(f"{v['ssim']:.3f}" for v in r["held_out"])
        lines.append(
            f"| {r['model']} | {r['probe']['held_out_accuracy']:.2f} | {r['tau']} | {ssims} | "
            f"{r['ceiling_exact']} / {r['ceiling_tau']} | {r['monai_timed_windows']} of {r['windows']} | "
            f"{r['monai_s_estimated']} | {r['kfx_exact_s']} | {r['kfx_tau_s']} | {r['exact_speedup_vs_monai']}x | "
            f"{r['tau_speedup_vs_monai']}x | {'met' if r['goal_5x_met'] else 'NOT met'} |"
        )
    lines += ["", "Tuning (per tau of the grid: lowest and mean SSIM over the tuning samples):", ""]
    for r in results:
        grid = ", ".join(
            f"{t}: {low:.3f} / {mean:.3f}"
            for t, low, mean in zip(r["tune"]["taus"], r["tune"]["lower_ssim"], r["tune"]["mean_ssim"])
        )
        lines.append(f"- {r['model']} ({r['tune']['seconds']} s): {grid}")
    return "\n".join(lines) + "\n"


def memory_markdown(rows: list[dict], args, info: dict, loads) -> str:
    lines = header("Peak memory of one 3-D occlusion call: kfx exact vs MONAI", info, loads) + [
        "Each row is a fresh spawned process: MONAI's network with random weights (memory does not depend on "
        f"them), the benchmark volume, mask {MASK}, overlap {OVERLAP}, fill 0.0; kfx is "
        "`kfx.monai.OcclusionSensitivity(..., batch_size=n_batch)` (exact), MONAI is "
        "`monai.visualize.OcclusionSensitivity(..., n_batch=n_batch)`. One warm-up call on a one-window b_box "
        "(kfx compiles its engine there; its cached base activations are dropped afterwards, so the measured "
        "call recomputes them), `malloc_trim(0)`, then the measured call on a b_box of "
        f"{args.memory_windows} x n_batch windows or more (memory per batch does not grow with the window "
        "count; the rest of a map is more of the same batches).",
        "",
        "Method: peak RSS growth = the kernel's high-water mark VmHWM (reset through /proc/self/clear_refs "
        "just before the call, so exact to the page, every allocation counted, torch or not) minus VmRSS "
        "before the call. Cross-check: a thread sampling /proc/self/statm every 1 ms. torch has no CPU "
        "max_memory_allocated; tracemalloc does not see torch's allocations.",
        "",
        "Allocator: `glibc` is the C library's malloc as users run it, where a freed block smaller than "
        "its mmap threshold (which rises up to 32 MiB as large blocks are freed) stays in the heap and "
        "counts in RSS until reused: the peak then depends on the order of allocations, and varies "
        "between identical runs. `fixed-mmap` starts each process with `MALLOC_MMAP_THRESHOLD_=131072`, "
        "so every block of 128 KiB or more is mapped on allocation and returned on free: RSS follows "
        "the live tensors (slower: every large allocation faults its pages in again).",
        "",
        f"{args.memory_repeats} fresh processes per method and allocator, kfx and MONAI alternating; peak "
        "growth median [lowest, highest].",
        "",
        "| model | side | n_batch | windows (b_box) | allocator | kfx peak growth MiB | MONAI peak growth MiB | "
        "kfx / MONAI (medians) | kfx call s | MONAI call s | goal: kfx <= MONAI (medians) | highest kfx <= highest MONAI |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in memory_summary(rows):
        if "goal_met" not in e:
            continue
        k, m = e["kfx"], e["monai"]
        lines.append(
            f"| {e['model']} | {e['side']} | {e['n_batch']} | {e['b_box'][:2]} per axis | {e['allocator']} | "
            f"{k['median']:.1f} [{k['min']:.1f}, {k['max']:.1f}] | {m['median']:.1f} [{m['min']:.1f}, {m['max']:.1f}] | "
            f"{e['ratio_of_medians']:.2f} | {k['median_call_s']:.1f} | {m['median_call_s']:.1f} | "
            f"{'met' if e['goal_met'] else 'NOT met'} | {'yes' if e['worst_met'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def write_results(tag: str, payload: dict, text: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{tag}.json").write_text(json.dumps(payload, indent=1))
    (RESULTS / f"{tag}.md").write_text(text)
    print(text, flush=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="*", default=["densenet121", "resnet18"], help="none: the signal only"
    )
    parser.add_argument("--sides", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--overlaps", type=float, nargs="+", default=[0.6, 0.8])
    parser.add_argument("--positions", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--monai-budget", type=float, default=600.0, help="seconds")
    parser.add_argument("--no-signal", action="store_true")
    parser.add_argument("--tag", default="volumes")
    parser.add_argument("--tau", action="store_true", help="only the tuned-tau comparison with MONAI")
    parser.add_argument("--memory", action="store_true", help="only the peak-memory comparison with MONAI")
    parser.add_argument("--side", type=int, default=64, help="--tau: volume side")
    parser.add_argument("--train-volumes", type=int, default=32, help="--tau: volumes the probe is fitted on")
    parser.add_argument("--tune-samples", type=int, default=3)
    parser.add_argument(
        "--timing-rounds", type=int, default=3, help="--tau: interleaved rounds of MONAI, kfx exact, kfx tau"
    )
    parser.add_argument("--tune-stride", type=int, default=12, help="--tau: map stride while tuning")
    parser.add_argument("--taus", type=float, nargs="+", default=[1.0, 0.7, 0.5, 0.4])
    parser.add_argument("--held-out", type=int, default=2, help="--tau: volumes the tuned tau is checked on")
    parser.add_argument(
        "--monai-windows",
        type=int,
        default=32,
        help="--tau: MONAI windows timed, at least (0: MONAI on the whole volume)",
    )
    parser.add_argument(
        "--memory-configs", nargs="+", default=["64:16"], help="--memory: side:n_batch, e.g. 64:16 128:4"
    )
    parser.add_argument("--memory-windows", type=int, default=2, help="--memory: batches per call, at least")
    parser.add_argument(
        "--memory-repeats", type=int, default=3, help="--memory: processes per method and allocator"
    )
    parser.add_argument("--allocators", nargs="+", default=list(ALLOCATORS), choices=list(ALLOCATORS))
    args = parser.parse_args(argv)
    info = {**machine(), "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])])}
    if args.tau or args.memory:
        return run_tau_and_memory(args, info)
    volumes = []
    for name in args.models:
        for side in args.sides:
            volumes += run_volume(name, side, args)
    signal = None if args.no_signal else run_signal(args)
    if signal:
        print(json.dumps(signal), flush=True)
    RESULTS.mkdir(exist_ok=True)
    payload = {"machine": info, "volumes": volumes, "signal": signal}
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(payload, indent=1))
    (RESULTS / f"{args.tag}.md").write_text(markdown(volumes, signal, args, info))
    print(markdown(volumes, signal, args, info))
    return payload


def run_tau_and_memory(args, info: dict) -> dict:
    import warnings

    # MONAI 1.6.1 indexes with lists on every window; torch warns each time
    warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing")
    payload = {}
    if args.tau:
        start = load_average()
        results = []
        for name in args.models:  # written after each model, so a long run keeps what it measured
            results.append(run_tau(name, args))
            loads = (start, load_average())
            payload["tau"] = {"machine": info, "load_average": loads, "results": results}
            write_results(f"{args.tag}_tau", payload["tau"], tau_markdown(results, args, info, loads))
    if args.memory:
        start = load_average()
        rows = []
        for config in args.memory_configs:
            side, n_batch = (int(v) for v in config.split(":"))
            for name in args.models:
                rows += run_memory(name, side, n_batch, args)
                loads = (start, load_average())
                payload["memory"] = {"machine": info, "load_average": loads, "rows": rows,
                                     "summary": memory_summary(rows)}  # fmt: skip
                write_results(
                    f"{args.tag}_memory", payload["memory"], memory_markdown(rows, args, info, loads)
                )
    return payload


if __name__ == "__main__":
    main()
