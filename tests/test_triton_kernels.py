"""Triton kernels (kfx.kernels._triton) against the torch reference (kfx.kernels.reference).

Tier "Triton": runs under TRITON_INTERPRET=1 on CPU tensors (set here, before triton is imported;
tiny shapes, the interpreter is slow), or natively on CUDA tensors when run with
TRITON_INTERPRET=0 on a GPU machine. Every test compares one launcher with the reference
composition it replaces:

    gather_paste_triton      == paste(gather_windows(pad_base(base), read + margin), ...)
    project_triton           == project
    incremental_conv_triton  ~= F.conv2d(<those windows>, weight, bias, stride, 0, dilation, groups)

Copies (gather/paste/project) must match bit for bit; the conv to float tolerance.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import doctest  # noqa: E402
import importlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kfx.geometry import conv_output_size, effective_kernel  # noqa: E402
from kfx.kernels import reference as R  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed: the Triton kernel tier cannot run")

from kfx.kernels import _triton as kt  # noqa: E402

if kt.IMPORT_ERROR is not None:
    pytest.skip(f"triton does not import: {kt.IMPORT_ERROR}", allow_module_level=True)


def _rebuild_interpreted():
    """Another module imported the kernels before TRITON_INTERPRET=1 was set: rebuild them (triton.jit
    chooses the interpreter at decoration time) so that they take CPU tensors."""
    for name in ("_window", "_host", "gather_paste", "project", "conv"):
        importlib.reload(importlib.import_module(f"kfx.kernels._triton.{name}"))
    importlib.reload(kt)


if os.environ["TRITON_INTERPRET"] == "1" and not kt.interpreted():
    _rebuild_interpreted()

DEVICE = torch.device("cpu" if kt.interpreted() else "cuda")
if not kt.available(DEVICE):
    pytest.skip("TRITON_INTERPRET=0 and no CUDA device: nothing can run the kernels", allow_module_level=True)

DTYPES = [torch.float32, torch.float64]
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-2, rtol=2e-2),
}


def _t(data, dtype=torch.long):
    return torch.tensor(data, dtype=dtype, device=DEVICE)


def _randn(*shape, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=DEVICE)


def reference_windows(base, read, size, patch, rel, pad_value=0.0):
    """The torch composition the kernels replace, for an *unpadded* base [C, H, W] and read-in
    origins that may leave it: pad once (pad_base), shift the origins, gather, paste."""
    h, w = size
    _, height, width = base.shape
    top = max(0, -int(read[:, 0].min()))
    left = max(0, -int(read[:, 1].min()))
    bottom = max(0, int(read[:, 0].max()) + h - height)
    right = max(0, int(read[:, 1].max()) + w - width)
    padded = R.pad_base(base[None], (top, bottom, left, right), pad_value)
    shifted = read + torch.tensor([top, left], device=read.device)
    windows = R.gather_windows(padded, shifted, size)
    return R.paste(windows, read, patch, read + rel)


# Read-in windows of size (4, 5) over a 6 x 7 base that cross every border (top, bottom, left,
# right, and corners; all four at once in the next test), and patches of 2 x 3 that hang off each
# side of their window or sit inside.
BASE_HW = (6, 7)
WIN = (4, 5)
READ = [[-2, -1], [3, 4], [0, -3], [-1, 3], [4, -2], [1, 1]]
REL = [[-1, 0], [3, 3], [1, -2], [2, 4], [0, 1], [-3, 5]]
PATCH_HW = (2, 3)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("pad_value", [0.0, float("-inf"), 1.5])
def test_gather_paste_crosses_every_border(dtype, pad_value):
    c = 5
    base = _randn(c, *BASE_HW, dtype=dtype)
    patch = _randn(len(READ), c, *PATCH_HW, dtype=dtype, seed=1)
    read, rel = _t(READ), _t(REL)
    got = kt.gather_paste_triton(base, read, WIN, patch, rel, pad_value=pad_value)
    assert torch.equal(got, reference_windows(base, read, WIN, patch, rel, pad_value))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_paste_window_larger_than_base(dtype):
    """Windows that overhang all four borders at once (an early layer of a tiny image)."""
    c, size = 3, (6, 7)
    base = _randn(c, 3, 4, dtype=dtype)
    read, rel = _t([[-1, -2], [-2, -1]]), _t([[0, 0], [4, 5]])
    patch = _randn(2, c, 2, 3, dtype=dtype, seed=8)
    got = kt.gather_paste_triton(base, read, size, patch, rel, pad_value=-2.5)
    assert torch.equal(got, reference_windows(base, read, size, patch, rel, -2.5))


@pytest.mark.parametrize("blocks", [(2, 16), (4, 32), (1, 1024)])
def test_gather_paste_partial_tiles(blocks):
    """Channel and pixel tiles that do not divide C = 7 and h * w = 5 * 7: every mask edge is hit."""
    c, size = 7, (5, 7)
    base = _randn(c, 9, 8)
    read, rel = _t([[-1, -2], [4, 1], [2, 3]]), _t([[0, 0], [3, 5], [-1, -1]])
    patch = _randn(3, c, 3, 2, seed=2)
    got = kt.gather_paste_triton(
        base, read, size, patch, rel, config=dict(BLOCK_C=blocks[0], BLOCK_S=blocks[1])
    )
    assert torch.equal(got, reference_windows(base, read, size, patch, rel))


def test_gather_paste_prepadded_base_matches_reference_exactly():
    """The way LocalStep calls the reference today: a base padded once, origins in padded coordinates."""
    c = 3
    base = _randn(1, c, 5, 6)
    padded = R.pad_base(base, (1, 2, 2, 1), 0.0)
    read = _t([[0, 0], [4, 4], [2, 1], [0, 4]])  # window corners inside the padded base (8 x 9)
    window_origin = read - _t([1, 2])  # the same windows in unpadded coordinates
    patch = _randn(4, c, 3, 3, seed=3)
    patch_origin = window_origin + _t([[0, 0], [1, 2], [-2, 1], [2, -1]])
    want = R.paste(R.gather_windows(padded, read, (4, 5)), window_origin, patch, patch_origin)
    got = kt.gather_paste_triton(padded, read, (4, 5), patch, patch_origin - window_origin)
    assert torch.equal(got, want)


def test_gather_paste_single_position_and_empty_batch():
    base = _randn(2, 4, 4)
    got = kt.gather_paste_triton(base, _t([[1, 1]]), (3, 3), _randn(1, 2, 1, 1, seed=4), _t([[1, 1]]))
    want = base[:, 1:4, 1:4].clone()
    want[:, 1, 1] = _randn(1, 2, 1, 1, seed=4)[0, :, 0, 0]
    assert torch.equal(got[0], want)
    empty = kt.gather_paste_triton(base, _t([[0, 0]])[:0], (3, 3), _randn(0, 2, 1, 1), _t([[0, 0]])[:0])
    assert empty.shape == (0, 2, 3, 3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 4])
def test_project_matches_reference_and_keeps_base(dtype, n):
    c, (height, width) = 3, (5, 7)
    base = _randn(c, height, width, dtype=dtype)
    keep = base.clone()
    patch = _randn(n, c, 2, 3, dtype=dtype, seed=5)
    origin = _t([[0, 0], [3, 4], [0, 4], [3, 0]][:n])  # every corner
    got = kt.project_triton(base, patch, origin)
    assert torch.equal(got, R.project(base, patch, origin))
    assert torch.equal(base, keep)


@pytest.mark.parametrize("blocks", [(2, 16), (1, 64)])
def test_project_partial_tiles(blocks):
    c = 5
    base = _randn(c, 6, 5)
    patch = _randn(3, c, 3, 2, seed=6)
    origin = _t([[1, 1], [3, 3], [0, 2]])
    got = kt.project_triton(base, patch, origin, config=dict(BLOCK_C=blocks[0], BLOCK_S=blocks[1]))
    assert torch.equal(got, R.project(base, patch, origin))


def test_project_clips_patches_off_the_tensor():
    base = _randn(2, 4, 4)
    patch = _randn(2, 2, 3, 3, seed=7)
    got = kt.project_triton(base, patch, _t([[-1, -2], [2, 3]]))
    want = base.expand(2, -1, -1, -1).clone()
    want[0, :, 0:2, 0:1] = patch[0, :, 1:3, 2:3]
    want[1, :, 2:4, 3:4] = patch[1, :, 0:2, 0:1]
    assert torch.equal(got, want)


def _conv_reference(base, read, size, patch, rel, weight, bias, stride, dilation, groups, pad_value=0.0):
    # The reference runs in float64 so that a float32 kernel is compared with the exact value.
    windows = reference_windows(base, read, size, patch, rel, pad_value).double()
    return F.conv2d(
        windows, weight.double(), None if bias is None else bias.double(), stride, 0, dilation, groups
    )


def _check_conv(
    c_in,
    c_out,
    groups,
    kernel,
    stride,
    dilation,
    out_hw,
    algorithm,
    dtype,
    *,
    bias=True,
    blocks=None,
    n=4,
    seed=0,
    pad_value=0.0,
    base_hw=(6, 7),
    patch_hw=(3, 2),
):
    kh, kw = kernel
    size = tuple(
        effective_kernel(k, d) + (o - 1) * s
        for k, d, o, s in zip(kernel, dilation, out_hw, stride, strict=True)
    )
    base = _randn(c_in, *base_hw, dtype=dtype, seed=seed)
    patch = _randn(n, c_in, *patch_hw, dtype=dtype, seed=seed + 1)
    weight = (
        _randn(c_out, c_in // groups, kh, kw, dtype=dtype, seed=seed + 2) / (c_in // groups * kh * kw) ** 0.5
    )
    b = _randn(c_out, dtype=dtype, seed=seed + 3) if bias else None
    gen = torch.Generator().manual_seed(seed)
    # Windows start up to 2 before / end up to 2 past the base; patches hang off the windows.
    read = torch.stack(
        [
            torch.randint(-2, max(-1, b_ - s + 3), (n,), generator=gen)
            for b_, s in zip(base_hw, size, strict=True)
        ],
        dim=1,
    ).to(DEVICE)
    rel = torch.stack(
        [torch.randint(-p + 1, s, (n,), generator=gen) for p, s in zip(patch_hw, size, strict=True)], dim=1
    ).to(DEVICE)
    got = kt.incremental_conv_triton(
        base,
        read,
        size,
        patch,
        rel,
        weight,
        b,
        stride=stride,
        dilation=dilation,
        groups=groups,
        pad_value=pad_value,
        algorithm=algorithm,
        config=_tiles(algorithm, blocks),
    )
    want = _conv_reference(base, read, size, patch, rel, weight, b, stride, dilation, groups, pad_value)
    assert got.shape == (n, c_out, *out_hw) and got.dtype == dtype
    torch.testing.assert_close(got.double(), want, **TOL[dtype])


def _tiles(algorithm, blocks):
    if blocks is None:
        return None
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K") if algorithm == "gemm" else ("BLOCK_M", "BLOCK_C")
    return dict(zip(keys, blocks, strict=True))


# (C_in, C_out, groups, kernel, stride, dilation, out_hw): odd channel counts, non-square kernels,
# stride and dilation per axis, grouped, depthwise, depthwise with a channel multiplier, 1x1, stem.
CONV_CASES = [
    pytest.param(5, 7, 1, (3, 3), (1, 1), (1, 1), (2, 3), id="plain-3x3"),
    pytest.param(3, 9, 1, (1, 3), (2, 1), (1, 2), (3, 2), id="1x3-stride-dilation"),
    pytest.param(6, 9, 3, (3, 1), (1, 2), (2, 1), (2, 2), id="grouped-3x1"),
    pytest.param(5, 5, 5, (3, 3), (2, 2), (1, 1), (2, 3), id="depthwise-s2"),
    pytest.param(3, 6, 3, (2, 2), (1, 1), (2, 2), (3, 2), id="depthwise-x2-dilated"),
    pytest.param(7, 3, 1, (1, 1), (1, 1), (1, 1), (3, 4), id="pointwise-1x1"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("algorithm", ["gemm", "direct"])
@pytest.mark.parametrize("c_in, c_out, groups, kernel, stride, dilation, out_hw", CONV_CASES)
def test_conv_matches_conv2d_on_windows(
    c_in, c_out, groups, kernel, stride, dilation, out_hw, algorithm, dtype
):
    blocks = (16, 16, 16) if algorithm == "gemm" else (16, 4)  # several M and C tiles, partial ones
    _check_conv(c_in, c_out, groups, kernel, stride, dilation, out_hw, algorithm, dtype, blocks=blocks)


@pytest.mark.parametrize("algorithm", ["gemm", "direct"])
def test_conv_without_bias_and_auto_choice(algorithm):
    _check_conv(3, 4, 1, (2, 2), (1, 1), (1, 1), (2, 2), algorithm, torch.float32, bias=False, n=2)
    _check_conv(17, 18, 1, (1, 1), (1, 1), (1, 1), (2, 2), "auto", torch.float32, n=2)  # auto -> gemm
    _check_conv(4, 4, 4, (3, 3), (1, 1), (1, 1), (2, 2), "auto", torch.float32, n=2)  # auto -> direct


def test_conv_gemm_loops_over_channel_chunks():
    """C_in/groups = 20 > BLOCK_K = 16 and C_out/groups = 18 > BLOCK_N = 16: partial K and N tiles."""
    _check_conv(40, 36, 2, (2, 1), (1, 1), (1, 1), (2, 2), "gemm", torch.float64, blocks=(16, 16, 16), n=2)


@pytest.mark.parametrize("algorithm", ["gemm", "direct"])
def test_conv_float16_accumulates_in_float32(algorithm):
    _check_conv(16, 16, 1, (3, 3), (1, 1), (1, 1), (2, 2), algorithm, torch.float16, n=2)


def test_conv_reads_pad_value_past_the_base():
    """A conv after a constant-pad with a non-zero value: reads past the base see pad_value."""
    _check_conv(3, 4, 1, (3, 3), (1, 1), (1, 1), (3, 3), "direct", torch.float64, pad_value=0.5, n=3)


@st.composite
def conv_configs(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]), label="groups")
    c_in = groups * draw(st.integers(1, 3), label="C_in per group")
    c_out = groups * draw(st.integers(1, 3), label="C_out per group")
    kernel = (draw(st.integers(1, 3), label="kh"), draw(st.integers(1, 3), label="kw"))
    stride = (draw(st.integers(1, 2), label="sh"), draw(st.integers(1, 2), label="sw"))
    dilation = (draw(st.integers(1, 2), label="dh"), draw(st.integers(1, 2), label="dw"))
    out_hw = (draw(st.integers(1, 3), label="h_out"), draw(st.integers(1, 3), label="w_out"))
    patch_hw = (draw(st.integers(1, 3), label="hp"), draw(st.integers(1, 3), label="wp"))
    return dict(
        c_in=c_in,
        c_out=c_out,
        groups=groups,
        kernel=kernel,
        stride=stride,
        dilation=dilation,
        out_hw=out_hw,
        patch_hw=patch_hw,
        n=draw(st.integers(1, 3), label="N"),
        seed=draw(st.integers(0, 2**16), label="seed"),
    )


# Bounded: each example is ~0.2 s in the interpreter. The "thorough" profile (conftest) gets more.
_EXAMPLES = 12 if settings.default.max_examples <= 100 else 60


@settings(max_examples=_EXAMPLES)
@given(cfg=conv_configs(), algorithm=st.sampled_from(["gemm", "direct"]))
def test_conv_property(cfg, algorithm):
    cfg = dict(cfg)
    args = [cfg.pop(k) for k in ("c_in", "c_out", "groups", "kernel", "stride", "dilation", "out_hw")]
    blocks = (16, 16, 16) if algorithm == "gemm" else (16, 2)
    _check_conv(*args, algorithm, torch.float64, blocks=blocks, **cfg)


def test_conv_output_size_is_pytorchs():
    """The window-to-output rule the launcher uses, against torch itself (padding 0)."""
    for size, k, s, d in [(7, 3, 2, 1), (9, 2, 3, 2), (5, 5, 1, 1)]:
        x = torch.zeros(1, 1, size, size)
        assert F.conv2d(x, torch.zeros(1, 1, k, k), stride=s, dilation=d).shape[-1] == conv_output_size(
            size, k, s, 0, d
        )


def test_errors_name_the_op():
    base, patch, read = _randn(2, 4, 4), _randn(1, 2, 1, 1), _t([[0, 0]])
    with pytest.raises(ValueError, match="gather_paste_triton: patch dtype"):
        kt.gather_paste_triton(base, read, (2, 2), patch.float(), read)
    with pytest.raises(ValueError, match=r"project_triton: origin must be an integer tensor \[1, 2\]"):
        kt.project_triton(base, patch, read.double())
    with pytest.raises(ValueError, match="incremental_conv_triton: stride must be positive"):
        kt.incremental_conv_triton(base, read, (2, 2), patch, read, _randn(2, 2, 1, 1), stride=(1, 0))
    with pytest.raises(ValueError, match=r"incremental_conv_triton: dilation must be an int or a pair"):
        kt.incremental_conv_triton(base, read, (2, 2), patch, read, _randn(2, 2, 1, 1), dilation=1.5)
    with pytest.raises(ValueError, match="incremental_conv_triton: weight"):
        kt.incremental_conv_triton(base, read, (2, 2), patch, read, _randn(2, 2, 1, 1), groups=2)
    with pytest.raises(ValueError, match="smaller than the kernel"):
        kt.incremental_conv_triton(base, read, (2, 2), patch, read, _randn(2, 2, 3, 3))


def test_available_says_where_kernels_run():
    assert kt.available() and kt.available(DEVICE)
    assert kt.available("cpu") == kt.interpreted()


@pytest.mark.skipif(DEVICE.type != "cpu", reason="doctest examples use CPU tensors (interpreter tier only)")
@pytest.mark.parametrize("module", ["gather_paste", "project", "conv"])
def test_docstring_examples(module):
    mod = importlib.import_module(f"kfx.kernels._triton.{module}")
    result = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_kernels_rebuild_for_the_interpreter_after_a_compiled_import():
    """What _rebuild_interpreted relies on: kernels imported (and triton with them) without
    TRITON_INTERPRET, reloaded with it, run on CPU tensors (no triton-stdlib jit helper inside)."""
    script = textwrap.dedent(
        """
        import importlib, os
        import torch
        import kfx.kernels._triton as kt
        assert not kt.interpreted()
        os.environ["TRITON_INTERPRET"] = "1"
        for name in ("_window", "_host", "gather_paste", "project", "conv"):
            importlib.reload(importlib.import_module("kfx.kernels._triton." + name))
        importlib.reload(kt)
        assert kt.interpreted()
        base, patch, o = torch.randn(2, 4, 4), torch.randn(1, 2, 2, 2), torch.tensor([[1, 1]])
        kt.gather_paste_triton(base, o, (3, 3), patch, o)
        kt.project_triton(base, patch, o)
        kt.incremental_conv_triton(base, o, (3, 3), patch, o, torch.randn(2, 2, 2, 2), algorithm="direct")
        kt.incremental_conv_triton(base, o, (3, 3), patch, o, torch.randn(2, 2, 2, 2), algorithm="gemm")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
