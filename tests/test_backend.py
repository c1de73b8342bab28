"""The engine with backend="triton" equals backend="torch" (and full inference).

Tier "Triton": TRITON_INTERPRET=1 runs the kernels on CPU tensors (set before triton is first
imported; tiny shapes, the interpreter is slow). On a GPU machine, run with TRITON_INTERPRET=0 and
a CUDA model to exercise the compiled kernels.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import kfx  # noqa: E402
from tests.strategies import Residual  # noqa: E402

triton_kernels = pytest.importorskip("kfx.kernels._triton")
if not triton_kernels.available("cpu"):
    pytest.skip(f"triton cannot run on CPU here: {triton_kernels.IMPORT_ERROR}", allow_module_level=True)


def tiny_dag() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 17, (3, 2), padding=1),  # 17 channels: the GEMM conv kernel, partial tiles
        nn.ReLU(),
        nn.ZeroPad2d((1, 0, 2, 0)),
        nn.MaxPool2d(2, 2, ceil_mode=True),
        Residual(17, 17, 3, 1, 2),  # depthwise-free residual with in-place add
        nn.Conv2d(17, 17, 3, stride=2, padding=1, groups=17),  # depthwise: the direct kernel
        nn.AvgPool2d(3, 1, 1, count_include_pad=False),
        nn.Upsample(scale_factor=2),  # resampling: gather and paste windows
        nn.GroupNorm(1, 17),  # global context: projection to full (project kernel)
        nn.Conv2d(17, 4, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_triton_backend_equals_torch_backend_and_full_inference(dtype, tolerance):
    model = tiny_dag().to(dtype)
    patch = kfx.Patch((3, 4), stride=3, fill=0.25)
    triton_engine = kfx.compile(model, (3, 11, 10), patch, backend="triton", batch_size=5)
    torch_engine = kfx.compile(model, (3, 11, 10), patch, backend="torch")
    assert triton_engine.backend == "triton" and torch_engine.backend == "torch"
    # the Triton kernels read contiguous maps; the torch engine of the same graph runs channels-last
    assert not triton_engine.compiled.channels_last and torch_engine.compiled.channels_last
    image = torch.randn(3, 11, 10, dtype=dtype, generator=torch.Generator().manual_seed(2))
    positions = torch.tensor([[0, 0], [0, 6], [8, 0], [8, 6], [4, 3], [5, 1], [2, 5]])
    with torch.no_grad():
        expected = model(kfx.occlude(image, positions, patch))
    by_triton = triton_engine.outputs(image, positions)
    by_torch = torch_engine.outputs(image, positions)
    scale = expected.abs().max()
    assert ((by_triton - by_torch).abs().max() / scale).item() <= tolerance
    assert ((by_triton - expected).abs().max() / scale).item() <= tolerance


def test_bad_backend_name():
    with pytest.raises(kfx.InputError, match="backend must be one of auto, torch, triton"):
        kfx.compile(tiny_dag(), (3, 11, 10), kfx.Patch(3), backend="cuda")


def test_auto_picks_torch_for_cpu_models():
    assert kfx.compile(tiny_dag(), (3, 11, 10), kfx.Patch(3)).backend == "torch"
