"""Fused incremental conv: implicit GEMM straight from the padded base and the patch buffer.

Semantics (oracle: torch):

    incremental_conv_triton(padded, read, size, patch, rel, weight, bias, stride, dilation, groups)
        == F.conv2d(gather_paste(padded, read, size, patch, rel), weight, bias,
                    stride, 0, dilation, groups)

No read-in window is materialized: each input element the conv needs is fetched through
_window._window_source (patch if the patch covers it, else base, else pad_value). Output size per
axis is PyTorch's formula with padding 0 (kfx.geometry.conv_output_size), so for the read-in
window of docs/design.md §2.3 (w_rd = k_eff + (w_out - 1) * s) it is exactly the changed box w_out.

Two kernels, chosen by the host (``algorithm="auto"``):

* ``_incremental_conv_gemm_kernel`` (C_out/groups >= 16 and C_in/groups >= 16): implicit GEMM per
  group, M = N * h_out * w_out output pixels, N = C_out/groups, K = C_in/groups * kh * kw. A program
  instance owns a [BLOCK_M pixels, BLOCK_N output channels] tile of one group; it walks the kernel
  taps (ky, kx) and, per tap, C_in/groups in BLOCK_K chunks: gathers an A tile [BLOCK_M, BLOCK_K]
  of window values (rows may belong to different positions: each row carries its own origins),
  loads a weight tile [BLOCK_K, BLOCK_N] and accumulates with tl.dot (fp32 accumulator; fp64 for
  fp64). Epilogue: + bias, masked store into [N, C_out, h_out, w_out].
* ``_incremental_conv_direct_kernel`` (depthwise and other thin groups, and C_in = 3 stems, where a
  >= 16-wide dot would be mostly padding): a program instance owns [BLOCK_M pixels, BLOCK_C output
  channels] across groups; per tap and per input channel of the group it gathers one [BLOCK_M,
  BLOCK_C] input tile (column co reads channel group(co) * C_in/groups + ci) and does an FMA with
  the weight vector. Same epilogue.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: F401  (used by the docstring example)
import triton
import triton.language as tl

from kfx.common import int_pair
from kfx.geometry import conv_output_size
from kfx.kernels._triton._host import check_tensors, origins, pow2_at_least
from kfx.kernels._triton._window import _window_source

__all__ = ["incremental_conv_triton", "gemm_config", "direct_config"]


@triton.jit
def _incremental_conv_gemm_kernel(
    base_ptr,
    read_ptr,
    patch_ptr,
    rel_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    N,
    C_in,
    Hp,
    Wp,
    hp,
    wp,
    C_out,
    h_out,
    w_out,
    Cig,
    Cog,
    KH,
    KW,
    sh,
    sw,
    dh,
    dw,
    pad_value,
    HAS_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    n_blocks = (Cog + BLOCK_N - 1) // BLOCK_N
    g = tl.program_id(1) // n_blocks
    co_g = (tl.program_id(1) % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co_g < Cog
    co = g * Cog + co_g
    hw_out = h_out * w_out
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < N * hw_out
    pos = m // hw_out
    oy = (m % hw_out) // w_out
    ox = m % w_out
    ry = tl.load(read_ptr + 2 * pos, mask=m_ok, other=0).to(tl.int32)[:, None]
    rx = tl.load(read_ptr + 2 * pos + 1, mask=m_ok, other=0).to(tl.int32)[:, None]
    py = tl.load(rel_ptr + 2 * pos, mask=m_ok, other=0).to(tl.int32)[:, None]
    px = tl.load(rel_ptr + 2 * pos + 1, mask=m_ok, other=0).to(tl.int32)[:, None]
    pos64 = pos.to(tl.int64)[:, None]
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=ACC_DTYPE)  # tl.full, not tl.zeros: see _window.py
    for ky in range(KH):
        y = (oy * sh + ky * dh)[:, None]
        for kx in range(KW):
            x = (ox * sw + kx * dw)[:, None]
            # Per pixel row: which buffer it reads (hoisted out of the channel loop).
            ptr, stride, readable = _window_source(
                base_ptr, patch_ptr, pos64, y, x, ry, rx, py, px, C_in, Hp, Wp, hp, wp
            )
            row_ok = m_ok[:, None] & readable
            for c0 in range(0, Cig, BLOCK_K):
                ci = c0 + tl.arange(0, BLOCK_K)
                ci_ok = ci < Cig
                a = tl.load(
                    ptr + (g * Cig + ci)[None, :] * stride, mask=row_ok & ci_ok[None, :], other=pad_value
                )
                a = tl.where(m_ok[:, None] & ci_ok[None, :], a, 0.0)  # no pad_value (-inf?) times a 0 weight
                wv = tl.load(
                    w_ptr + ((co[None, :] * Cig + ci[:, None]) * KH + ky) * KW + kx,
                    mask=ci_ok[:, None] & co_ok[None, :],
                    other=0.0,
                )
                acc = tl.dot(a, wv, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=co_ok, other=0.0).to(ACC_DTYPE)[None, :]
    out_off = (pos64 * C_out + co[None, :]) * hw_out + (oy * w_out + ox)[:, None]
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & co_ok[None, :])


@triton.jit
def _incremental_conv_direct_kernel(
    base_ptr,
    read_ptr,
    patch_ptr,
    rel_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    N,
    C_in,
    Hp,
    Wp,
    hp,
    wp,
    C_out,
    h_out,
    w_out,
    Cig,
    Cog,
    KH,
    KW,
    sh,
    sw,
    dh,
    dw,
    pad_value,
    HAS_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    co = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    co_ok = co < C_out
    cin0 = ((co // Cog) * Cig)[None, :]  # first input channel of each output channel's group
    hw_out = h_out * w_out
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < N * hw_out
    pos = m // hw_out
    oy = (m % hw_out) // w_out
    ox = m % w_out
    ry = tl.load(read_ptr + 2 * pos, mask=m_ok, other=0).to(tl.int32)[:, None]
    rx = tl.load(read_ptr + 2 * pos + 1, mask=m_ok, other=0).to(tl.int32)[:, None]
    py = tl.load(rel_ptr + 2 * pos, mask=m_ok, other=0).to(tl.int32)[:, None]
    px = tl.load(rel_ptr + 2 * pos + 1, mask=m_ok, other=0).to(tl.int32)[:, None]
    pos64 = pos.to(tl.int64)[:, None]
    valid = m_ok[:, None] & co_ok[None, :]
    acc = tl.full((BLOCK_M, BLOCK_C), 0.0, dtype=ACC_DTYPE)
    for ky in range(KH):
        y = (oy * sh + ky * dh)[:, None]
        for kx in range(KW):
            x = (ox * sw + kx * dw)[:, None]
            ptr, stride, readable = _window_source(
                base_ptr, patch_ptr, pos64, y, x, ry, rx, py, px, C_in, Hp, Wp, hp, wp
            )
            for ci in range(Cig):
                a = tl.load(ptr + (cin0 + ci) * stride, mask=valid & readable, other=pad_value)
                a = tl.where(valid, a, 0.0)  # no pad_value (-inf?) times a 0 weight
                wv = tl.load(w_ptr + ((co * Cig + ci) * KH + ky) * KW + kx, mask=co_ok, other=0.0)
                acc += a.to(ACC_DTYPE) * wv.to(ACC_DTYPE)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=co_ok, other=0.0).to(ACC_DTYPE)[None, :]
    out_off = (pos64 * C_out + co[None, :]) * hw_out + (oy * w_out + ox)[:, None]
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=valid)


def gemm_config(dtype: torch.dtype, cog: int, cig: int) -> dict:
    """Tile and launch shape of the GEMM kernel: BLOCK_N/BLOCK_K shrink to thin groups (>= 16, tl.dot's
    minimum). 64x64x16 with 8 warps and 2 stages is the largest tile that ptxas (sm_90) compiles
    without register spills for fp32 ieee and tf32 (64x64x32 / 4 warps / 3 stages spilled 750 bytes
    per thread). Not yet timed on a GPU: benchmarks/gpu_kernels.py --sweep is the place to tune it."""
    return dict(
        BLOCK_M=64,
        BLOCK_N=pow2_at_least(cog, 16, 64),
        BLOCK_K=16,
        num_warps=8,
        num_stages=2 if dtype != torch.float64 else 1,
    )


def direct_config(dtype: torch.dtype, c_out: int) -> dict:
    """Tile and launch shape of the direct kernel: 64 pixels x 32 channels, 8 warps (spill-free on
    sm_90; a 64x64 tile with 4 warps spilled 1.2 KB per thread). Not yet timed on a GPU."""
    return dict(BLOCK_M=64, BLOCK_C=pow2_at_least(c_out, 1, 32), num_warps=8, num_stages=1)


def _positive_pair(value, name: str) -> tuple[int, int]:
    pair = int_pair(value, f"incremental_conv_triton: {name}", ValueError)
    if min(pair) < 1:
        raise ValueError(f"incremental_conv_triton: {name} must be positive, got {value!r}")
    return pair


def incremental_conv_triton(
    padded_base: torch.Tensor,
    read_origin_padded: torch.Tensor,
    size: tuple[int, int],
    patch: torch.Tensor,
    patch_origin_rel: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    stride: int | tuple[int, int] = 1,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    pad_value: float = 0.0,
    input_precision: str = "ieee",
    algorithm: str = "auto",
    config: dict | None = None,
) -> torch.Tensor:
    """New changed patches [N, C_out, h_out, w_out] of a conv layer, from the base and the input patches.

    padded_base [C_in, Hp, Wp], read_origin_padded [N, 2], size (h, w) of the read-in window,
    patch [N, C_in, hp, wp], patch_origin_rel [N, 2]: exactly gather_paste_triton's arguments
    (reads outside padded_base see ``pad_value``). weight [C_out, C_in/groups, kh, kw], bias [C_out].
    The conv runs with padding 0 on the window: h_out = (h - k_eff_h) // stride_h + 1.
    ``input_precision``: tl.dot's for fp32 ("ieee" exact fp32 FMAs; "tf32"/"tf32x3" faster on
    tensor cores, ~1e-3 relative error). ``algorithm``: "auto", "gemm" or "direct" (see module doc);
    ``config``: overrides of :func:`gemm_config` / :func:`direct_config` (tile sizes, num_warps,
    num_stages), for tests and sweeps.

    >>> base, w = torch.randn(4, 6, 6), torch.randn(8, 4, 3, 3)
    >>> read, rel, patch = torch.tensor([[0, 1]]), torch.tensor([[1, 1]]), torch.zeros(1, 4, 2, 2)
    >>> window = base[:, 0:5, 1:6].clone()
    >>> window[:, 1:3, 1:3] = patch[0]
    >>> got = incremental_conv_triton(base, read, (5, 5), patch, rel, w)
    >>> torch.allclose(got, F.conv2d(window[None], w), atol=1e-5)
    True
    """
    op = "incremental_conv_triton"
    if (
        padded_base.dim() != 3
        or patch.dim() != 4
        or weight.dim() != 4
        or patch.shape[1] != padded_base.shape[0]
    ):
        raise ValueError(
            f"{op}: expected padded_base [C, Hp, Wp], patch [N, C, hp, wp], weight [Co, C/g, kh, kw];"
            f" got {tuple(padded_base.shape)}, {tuple(patch.shape)}, {tuple(weight.shape)}"
        )
    n, c_in, hp, wp = patch.shape
    c_out, cig, kh, kw = weight.shape
    if groups < 1 or c_in % groups or c_out % groups or cig != c_in // groups:
        raise ValueError(f"{op}: weight {tuple(weight.shape)} does not fit C_in={c_in}, groups={groups}")
    if (
        len({padded_base.dtype, patch.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set()))
        != 1
    ):
        raise ValueError(f"{op}: base, patch, weight and bias must share one dtype")
    sh, sw = _positive_pair(stride, "stride")
    dh, dw = _positive_pair(dilation, "dilation")
    h, w = (int(v) for v in size)
    h_out, w_out = conv_output_size(h, kh, sh, 0, dh), conv_output_size(w, kw, sw, 0, dw)
    if h_out < 1 or w_out < 1:
        raise ValueError(f"{op}: window {h}x{w} smaller than the kernel's extent")
    tensors = [padded_base, read_origin_padded, patch, patch_origin_rel, weight] + (
        [bias] if bias is not None else []
    )
    check_tensors(op, *tensors)
    read = origins(op, "read_origin_padded", read_origin_padded, n)
    rel = origins(op, "patch_origin_rel", patch_origin_rel, n)
    base, patch, weight = padded_base.contiguous(), patch.contiguous(), weight.contiguous()
    bias_arg = bias.contiguous() if bias is not None else weight  # never read when HAS_BIAS is False
    out = torch.empty((n, c_out, h_out, w_out), dtype=base.dtype, device=base.device)
    if out.numel() == 0:
        return out
    cog = c_out // groups
    if algorithm == "auto":
        algorithm = "gemm" if cog >= 16 and cig >= 16 else "direct"
    acc_dtype = tl.float64 if base.dtype == torch.float64 else tl.float32
    m_total = n * h_out * w_out
    common = (
        base,
        read,
        patch,
        rel,
        weight,
        bias_arg,
        out,
        n,
        c_in,
        base.shape[1],
        base.shape[2],
        hp,
        wp,
        c_out,
        h_out,
        w_out,
        cig,
        cog,
        kh,
        kw,
        sh,
        sw,
        dh,
        dw,
        float(pad_value),
    )
    if algorithm not in ("gemm", "direct"):
        raise ValueError(f"{op}: algorithm must be 'auto', 'gemm' or 'direct', got {algorithm!r}")
    consts = dict(HAS_BIAS=bias is not None, ACC_DTYPE=acc_dtype)
    if algorithm == "gemm":
        cfg = {**gemm_config(base.dtype, cog, cig), **(config or {})}
        grid = (triton.cdiv(m_total, cfg["BLOCK_M"]), groups * triton.cdiv(cog, cfg["BLOCK_N"]))
        _incremental_conv_gemm_kernel[grid](*common, **consts, PRECISION=input_precision, **cfg)
    else:
        cfg = {**direct_config(base.dtype, c_out), **(config or {})}
        grid = (triton.cdiv(m_total, cfg["BLOCK_M"]), triton.cdiv(c_out, cfg["BLOCK_C"]))
        _incremental_conv_direct_kernel[grid](*common, **consts, **cfg)
    return out
