"""GPU speed of the Triton kernels (kfx.kernels._triton) against the torch reference path, per layer.

Run on a CUDA machine:  python benchmarks/gpu_kernels.py [--batch 128] [--patch 16] [--layers 1,8]
Without a CUDA device it prints why and exits 0. ``--dry-run`` checks the script itself on CPU
(interpreter, each row run once, timings meaningless): --dry-run --image 32 --patch 4 --batch 2.
Speed only: nothing here is asserted in tests (a max-abs-error column is printed as a sanity check).
Baselines are imported from kfx.kernels.reference so that the two cannot drift.

Workload: VGG16 (13 convs 3x3/pad 1, 5 max-pools 2x2) on 224x224, a 16x16 patch, a batch of 128
patch positions drawn from the stride-4 grid (53 x 53 positions). Box sizes per layer follow
kfx.geometry (docs/design.md §2.3) with the uniform width; starts vary per position.

For each conv layer it times
  gather_paste   gather_paste_triton                  vs reference gather_windows + paste
  conv           incremental_conv_triton fp32          vs reference gather + paste + F.conv2d
                 ("ieee": exact fp32 FMAs; "tf32": tensor cores, ~1e-3 relative error; cuDNN with
                 allow_tf32 matching)
and once the projection to full before the classifier (project_triton vs reference project).
``--ptxas`` (no GPU needed) compiles every kernel for sm_90 and prints registers/spills per thread.
``--sweep`` also times the conv GEMM kernel over SWEEP's tiles/warps/stages and prints the best.
Reported: median time (triton.testing.do_bench, 20th-80th percentile), achieved GB/s and % of HBM
peak for the copies, TFLOP/s and % of the fp32 (non-tensor) peak for the conv.

Bytes counted = the HBM traffic a perfect kernel cannot avoid: every output element written once,
every input element read once from where it comes from (patch or base; a base element shared by
several positions' windows counted once per window up to the base's size), weights once.

Paper estimate for an H100 SXM (3.35 TB/s HBM3, ~67 TFLOP/s fp32 FMA, ~495 TFLOP/s dense TF32),
fp32, batch 128, patch 16 at the image centre (the worst case; docs/design.md §2.7):

    layer    C_in->C_out @H  box->window->out  gather_paste MB, us@peak  conv GFLOP, us@peak  conv MB
    conv1_1     3->  64 @224   16 -> 20 -> 18       1.2      0.4            0.1       2         11
    conv1_2    64->  64 @224   18 -> 22 -> 20      31.7      9.5            3.8      56         29
    conv2_1    64-> 128 @112   11 -> 15 -> 13      14.7      4.4            3.2      48         19
    conv2_2   128-> 128 @112   13 -> 17 -> 15      37.9     11.3            8.5     127         34
    conv3_1   128-> 256 @ 56    8 -> 12 -> 10      18.9      5.6            7.5     113         24
    conv3_2   256-> 256 @ 56   10 -> 14 -> 12      51.4     15.3           21.7     325         47
    conv3_3   256-> 256 @ 56   12 -> 16 -> 14      67.1     20.0           29.6     442         62
    conv4_1   256-> 512 @ 28    8 -> 12 -> 10      37.7     11.3           30.2     451         50
    conv4_2   512-> 512 @ 28   10 -> 14 -> 12     102.8     30.7           87.0    1298         99
    conv4_3   512-> 512 @ 28   12 -> 16 -> 14     134.2     40.1          118.4    1767        128
    conv5_1   512-> 512 @ 14    8 -> 12 -> 10      75.5     22.5           60.4     902         73
    conv5_2   512-> 512 @ 14   10 -> 14 -> 12     102.8     30.7           87.0    1298         99
    conv5_3   512-> 512 @ 14   12 -> 16 -> 14     134.2     40.1          118.4    1767        128
    total                                         810      242            576      8594        802
    project (pool5 -> flatten): [128, 512, 7, 7], the whole 7x7 map changed: 26 MB, 7.7 us at peak.

(us@peak: bytes / 3.35 TB/s, FLOPs / 67 TFLOP/s. gather_paste MB = 2 x window bytes: each window
element written once and read once; conv MB = windows + weights + output; GFLOP = 2 * N * C_out *
h_out * w_out * C_in * 9. One heat map at stride 4 is 2,809 positions = 22 batches of 128.)

What each kernel should reach:
- gather_paste / project are pure copies with per-element index math: 60-80% of HBM peak on the
  layers above ~30 MB (2-2.7 TB/s), well under on conv1_1 (1.2 MB) and project (26 MB: ~8 us is
  near launch overhead, expect 20-40%). Total gather_paste per batch: 0.24 ms at peak, ~0.35 ms
  expected; the reference (index_select, then gather + where) moves ~3x the bytes in 3+ launches.
- incremental conv: arithmetic intensity 130-925 FLOP/byte (conv1_1: 13), far above the H100's
  ridge (67e12 / 3.35e12 = 20), so every layer but conv1_1 is compute bound. "ieee" fp32 tl.dot
  lowers to FMAs: a well-tuned Triton fp32 GEMM reaches ~60-70% of 67 TFLOP/s; the implicit
  gather (two masked loads per A element, per-row origins) and the small M of the deep layers
  (N * 14 * 14 = 25,088 rows, 512 columns: ~3,100 64x64 tiles over 132 SMs, fine) should leave
  ~40-55%, i.e. 15-21 ms per batch of 128 for all 13 convs versus 8.6 ms at peak. "tf32" on tensor
  cores: the gather, not the MMA, bounds it; expect 100-200 TFLOP/s (3-6 ms per batch). cuDNN on
  materialized windows is the bar to beat; the fused kernel's win is mostly memory (no [N, C, h, w]
  windows: 810 MB per batch not written and re-read), worth ~0.25-0.5 ms per batch, <5%.
The block sizes in the launchers are starting points, not a sweep; these numbers are paper
estimates until this script has been run on the device.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

from kfx.geometry import changed_output_span, heatmap_size, read_in_span
from kfx.kernels import reference as R

# (HBM bytes/s, fp32 non-tensor FLOP/s, dense TF32 FLOP/s) by device-name substring; first match wins.
PEAKS = [
    ("H100 PCIe", (2.0e12, 51e12, 378e12)),
    ("H100", (3.35e12, 67e12, 495e12)),
    ("H200", (4.8e12, 67e12, 495e12)),
    ("A100", (2.0e12, 19.5e12, 156e12)),
]

# Conv GEMM configs tried by --sweep (the launcher's default is gemm_config's).
SWEEP = [
    dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st)
    for bm in (64, 128)
    for bn in (64, 128)
    for bk in (16, 32)
    for w in (4, 8)
    for st in (1, 2, 3)
]

VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def _spans(starts: list[int], width: int, *, kernel: int, stride: int, padding: int, size: int):
    """Per-position output spans (uniform width) and read-in spans of one local layer along one axis."""
    out = [
        changed_output_span(s, width, kernel=kernel, stride=stride, padding=padding, out_size=size)
        for s in starts
    ]
    read = [read_in_span(o.start, o.width, kernel=kernel, stride=stride, padding=padding) for o in out]
    return out, read


def vgg16_layers(image: int, patch: int, positions: torch.Tensor):
    """Per conv layer: dict(name, c_in, c_out, size, in_starts [N, 2], in_width, read_starts [N, 2],
    read_width, out_width). Boxes are square here (square image and patch); starts vary per position."""
    layers, c, size, width = [], 3, image, patch
    starts = positions.clone()
    block, index = 1, 1
    for v in VGG16:
        if v == "M":
            out_size = size // 2
            axes = [
                _spans(starts[:, a].tolist(), width, kernel=2, stride=2, padding=0, size=out_size)[0]
                for a in range(2)
            ]
            starts = torch.tensor([[ay.start, ax.start] for ay, ax in zip(*axes, strict=True)])
            width, size = axes[0][0].width, out_size
            block, index = block + 1, 1
            continue
        axes = [
            _spans(starts[:, a].tolist(), width, kernel=3, stride=1, padding=1, size=size) for a in range(2)
        ]
        out = torch.tensor([[y.start, x.start] for y, x in zip(axes[0][0], axes[1][0], strict=True)])
        read = torch.tensor([[y.start, x.start] for y, x in zip(axes[0][1], axes[1][1], strict=True)])
        layers.append(
            dict(
                name=f"conv{block}_{index}",
                c_in=c,
                c_out=v,
                size=size,
                in_starts=starts,
                in_width=width,
                read_starts=read,
                read_width=axes[0][1][0].width,
                out_width=axes[0][0][0].width,
            )
        )
        starts, width, c, index = out, axes[0][0][0].width, v, index + 1
    return layers, (c, size, starts, width)


def _copy_bytes(n: int, c: int, window: int, patch: int, base_numel: int, es: int) -> int:
    """Output written once; the window's patch part read from the patch, the rest from the base
    (capped at the base's size: overlapping windows share base elements)."""
    win, inside = n * c * window * window, n * c * min(patch, window) ** 2
    return es * (win + inside + min(win - inside, base_numel))


def _bench(fn) -> tuple[float, float, float]:
    import triton.testing

    median, low, high = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
    return median, low, high


def _once(fn) -> tuple[float, float, float]:
    start = time.perf_counter()
    fn()
    ms = (time.perf_counter() - start) * 1e3
    return ms, ms, ms


class Reporter:
    """Prints one row per (layer, kernel) and keeps the medians for the totals."""

    HEADER = (
        f"{'layer':8s} {'kernel':22s} {'ms (p20-p80)':>26s} {'GB/s':>8s} {'%HBM':>6s}"
        f" {'TFLOP/s':>8s} {'%peak':>6s} {'max err':>9s}"
    )

    def __init__(self, peak_bw, peak_fp32, peak_tf32):
        self.peak_bw, self.peak_fp32, self.peak_tf32 = peak_bw, peak_fp32, peak_tf32
        self.rows: list[tuple[str, str, float]] = []
        print(self.HEADER)

    @staticmethod
    def _pct(value, peak):
        return f"{100 * value / peak:5.1f}%" if peak else "   n/a"

    def __call__(self, layer, kernel, times, nbytes, flops=None, err=None, tensor_peak=False):
        median, low, high = times
        rate = nbytes / (median * 1e-3)
        line = f"{layer:8s} {kernel:22s} {median:9.4f} ({low:.4f}-{high:.4f})"
        line += f" {rate / 1e9:8.1f} {self._pct(rate, self.peak_bw)}"
        if flops is not None:
            fl = flops / (median * 1e-3)
            line += f" {fl / 1e12:8.2f} {self._pct(fl, self.peak_tf32 if tensor_peak else self.peak_fp32)}"
        else:
            line += f" {'':8s} {'':6s}"
        if err is not None:
            line += f" {err:9.2e}"
        print(line, flush=True)
        self.rows.append((layer, kernel, median))

    def totals(self):
        print("\ntotals over the chosen layers (ms per batch):")
        for kernel in sorted({k for _, k, _ in self.rows}):
            print(f"  {kernel:24s} {sum(t for _, k, t in self.rows if k == kernel):9.3f}")


def bench_conv_layer(kt, layer: dict, n: int, device, dtype, bench, report, *, sweep: bool, tf32: bool):
    """gather_paste and the fused conv of one VGG16 layer, each against the reference path."""
    c_in, c_out, w_in, w_rd, w_out = (
        layer[k] for k in ("c_in", "c_out", "in_width", "read_width", "out_width")
    )
    es = torch.finfo(dtype).bits // 8
    base = torch.randn(1, c_in, layer["size"], layer["size"], device=device, dtype=dtype)
    padded = R.pad_base(base, (1, 1, 1, 1), 0.0)  # conv padding 1 on every side
    read = layer["read_starts"].to(device)  # unpadded coordinates (reference paste)
    read_padded = read + 1
    patch_origin = layer["in_starts"].to(device)
    rel = patch_origin - read
    patch = torch.randn(n, c_in, w_in, w_in, device=device, dtype=dtype)
    weight = torch.randn(c_out, c_in, 3, 3, device=device, dtype=dtype) / (9 * c_in) ** 0.5
    bias = torch.randn(c_out, device=device, dtype=dtype)
    window = (w_rd, w_rd)

    def ref_windows():
        return R.paste(R.gather_windows(padded, read_padded, window), read, patch, patch_origin)

    def gather_paste():
        return kt.gather_paste_triton(padded, read_padded, window, patch, rel)

    def ref_conv():
        return F.conv2d(ref_windows(), weight, bias)

    def fused(precision, config=None, algorithm="auto"):
        return kt.incremental_conv_triton(
            padded, read_padded, window, patch, rel, weight, bias,
            input_precision=precision, algorithm=algorithm, config=config,
        )  # fmt: skip

    name = layer["name"]
    copy_bytes = _copy_bytes(n, c_in, w_rd, w_in, padded.numel(), es)
    err = (gather_paste() - ref_windows()).abs().max().item()
    report(name, "gather_paste triton", bench(gather_paste), copy_bytes, err=err)
    report(name, "gather_paste reference", bench(ref_windows), copy_bytes)

    flops = 2 * n * c_out * w_out * w_out * c_in * 9
    conv_bytes = copy_bytes // 2 + es * (weight.numel() + c_out + n * c_out * w_out * w_out)
    for precision in ("ieee", "tf32") if tf32 else ("ieee",):
        torch.backends.cudnn.allow_tf32 = precision == "tf32"
        tensor = precision == "tf32"
        err = (fused(precision) - ref_conv()).abs().max().item()
        report(
            name,
            f"conv triton {precision}",
            bench(lambda p=precision: fused(p)),
            conv_bytes,
            flops,
            err,
            tensor,
        )
        if sweep:
            timed = []
            for cfg in SWEEP:
                try:
                    timed.append((bench(lambda p=precision, c=cfg: fused(p, c, "gemm"))[0], cfg))
                except Exception as error:  # e.g. out of resources for the big tiles
                    print(f"    sweep {cfg}: {type(error).__name__}: {str(error)[:80]}")
            best_ms, best = min(timed, key=lambda item: item[0])
            print(f"    sweep best {best_ms:.4f} ms ({flops / (best_ms * 1e-3) / 1e12:.2f} TFLOP/s): {best}")
        report(name, f"conv reference {precision}", bench(ref_conv), conv_bytes, flops, tensor_peak=tensor)
    torch.backends.cudnn.allow_tf32 = True


def bench_project(kt, channels, size, starts, width, n, device, dtype, bench, report):
    """Projection to full before the classifier: pool5's output with its changed box per position."""
    base = torch.randn(channels, size, size, device=device, dtype=dtype)
    patch = torch.randn(n, channels, width, width, device=device, dtype=dtype)
    origin = starts.to(device)
    nbytes = (
        (torch.finfo(dtype).bits // 8) * 2 * n * channels * size**2
    )  # each element written once, read once
    err = (kt.project_triton(base, patch, origin) - R.project(base, patch, origin)).abs().max().item()
    report(
        "project", "project triton", bench(lambda: kt.project_triton(base, patch, origin)), nbytes, err=err
    )
    report("project", "project reference", bench(lambda: R.project(base, patch, origin)), nbytes)


def ptxas_report(arch: int = 90) -> int:
    """Compile every kernel at the launchers' default configs for sm_<arch> (no GPU needed: Triton
    ships ptxas) and print registers and spills per thread; how gemm_config/direct_config were chosen."""
    import subprocess
    import tempfile

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kfx.kernels._triton import conv, gather_paste, project

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    names = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16"}

    def compile_one(fn, dtype, consts, label):
        options = {k: consts.pop(k) for k in ("num_warps", "num_stages") if k in consts}

        def arg_type(arg):
            if arg in ("read_ptr", "rel_ptr", "origin_ptr"):
                return "*i64"
            return "*" + names[dtype] if arg.endswith("_ptr") else "fp32" if arg == "pad_value" else "i32"

        signature = {a: "constexpr" if a in consts else arg_type(a) for a in fn.arg_names}
        kernel = triton.compile(
            ASTSource(fn, signature, consts), target=GPUTarget("cuda", arch, 32), options=options
        )
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(kernel.asm["ptx"])
        log = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a", f.name, "-o", os.devnull],
                             capture_output=True, text=True).stderr  # fmt: skip
        os.unlink(f.name)
        info = [
            line.split("info    : ")[-1].strip()
            for line in log.splitlines()
            if "registers" in line or "spill" in line
        ]
        print(f"{label:44s} {' | '.join(info)}", flush=True)

    for dtype in names:
        acc = tl.float64 if dtype == torch.float64 else tl.float32
        for precision in ("ieee", "tf32") if dtype == torch.float32 else ("ieee",):
            cfg = conv.gemm_config(dtype, 512, 512)
            consts = dict(HAS_BIAS=True, ACC_DTYPE=acc, PRECISION=precision, **cfg)
            compile_one(
                conv._incremental_conv_gemm_kernel, dtype, consts, f"conv gemm {names[dtype]} {precision}"
            )
        consts = dict(HAS_BIAS=True, ACC_DTYPE=acc, **conv.direct_config(dtype, 512))
        compile_one(conv._incremental_conv_direct_kernel, dtype, consts, f"conv direct {names[dtype]}")
        compile_one(
            gather_paste._gather_paste_kernel,
            dtype,
            dict(BLOCK_C=4, BLOCK_S=512),
            f"gather_paste {names[dtype]}",
        )
        compile_one(project._project_kernel, dtype, dict(BLOCK_C=32, BLOCK_S=64), f"project {names[dtype]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--stride", type=int, default=4, help="heat-map stride the positions are drawn from")
    parser.add_argument("--layers", default="all", help="comma-separated 1-based conv indices, or 'all'")
    parser.add_argument("--peak-bw", type=float, help="HBM bytes/s, when the device is not in PEAKS")
    parser.add_argument("--peak-flops", type=float, help="fp32 non-tensor FLOP/s, when not in PEAKS")
    parser.add_argument("--dry-run", action="store_true", help="CPU + TRITON_INTERPRET=1, each row once")
    parser.add_argument("--sweep", action="store_true", help="time SWEEP's conv GEMM configs, print the best")
    parser.add_argument(
        "--ptxas", action="store_true", help="no GPU needed: registers/spills per kernel (sm_90)"
    )
    args = parser.parse_args(argv)

    if args.ptxas:
        os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not interpreted ones
        return ptxas_report()

    bench = _bench
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before kfx.kernels._triton (and triton.jit) is imported
        bench = _once
    elif not torch.cuda.is_available():
        print("gpu_kernels: no CUDA device here; this benchmark only runs on a GPU (nothing measured).")
        return 0
    from kfx.kernels import _triton as kt

    device = torch.device("cpu" if args.dry_run else "cuda")
    if not kt.available(device) or (device.type == "cuda" and kt.interpreted()):
        print(
            f"gpu_kernels: Triton kernels unavailable on {device} (import error: {kt.IMPORT_ERROR}, "
            f"interpreter on: {kt.interpreted()}); unset TRITON_INTERPRET on a GPU machine."
        )
        return 0

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run, interpreter)"
    peak_bw, peak_fp32, peak_tf32 = next((p for key, p in PEAKS if key in name), (None, None, None))
    peak_bw, peak_fp32 = args.peak_bw or peak_bw, args.peak_flops or peak_fp32
    print(f"device: {name}; peaks: HBM {peak_bw} B/s, fp32 {peak_fp32} FLOP/s, tf32 {peak_tf32} FLOP/s")
    print("(%peak: of fp32 for ieee rows, of dense TF32 tensor cores for tf32 rows; n/a: unknown device)")

    grid = heatmap_size(args.image, args.patch, args.stride)
    flat = torch.randperm(grid * grid, generator=torch.Generator().manual_seed(0))[: args.batch]
    positions = torch.stack((flat // grid, flat % grid), dim=1) * args.stride
    n = positions.shape[0]
    layers, (c_last, size_last, starts_last, width_last) = vgg16_layers(args.image, args.patch, positions)
    chosen = range(1, len(layers) + 1) if args.layers == "all" else [int(i) for i in args.layers.split(",")]
    dtype = torch.float32
    torch.manual_seed(0)
    report = Reporter(peak_bw, peak_fp32, peak_tf32)
    for index in chosen:
        bench_conv_layer(
            kt, layers[index - 1], n, device, dtype, bench, report,
            sweep=args.sweep and not args.dry_run, tf32=not args.dry_run,  # the interpreter ignores tf32
        )  # fmt: skip
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bench_project(kt, c_last, size_last, starts_last, width_last, n, device, dtype, bench, report)
    report.totals()
    return 0


if __name__ == "__main__":
    sys.exit(main())
