"""How much work kfx.compile does (issue #19 item 2), counted, never timed: the model runs three
times, tracing reads the model's tensor list once, and the changes leave the traced graph and the
box tables what torch.fx and the per-coordinate equations give."""

import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import kfx
import kfx.passes.trace  # noqa: F401  (kfx.passes.trace is also the name of the function)
from kfx.geometry import Span, read_in_span, shift_inside, thresholded_output_span, union_span
from kfx.passes.boxes import AxisBoxes
from kfx.passes.boxes import local_axis as _local_axis
from kfx.passes.boxes import merge_axis as _merge_axis

trace_module = sys.modules["kfx.passes.trace"]
SHAPE = (3, 16, 16)


class FunctionalNorms(nn.Module):
    """Reads parameters and buffers in forward (as timm's BatchNormAct2d does), one parameter
    registered under two names (tied), and one buffer shared by two modules."""

    def __init__(self, blocks: int = 6):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4 if i else 3, 4, 3, padding=1) for i in range(blocks))
        self.norms = nn.ModuleList(nn.BatchNorm2d(4) for _ in range(blocks))
        self.norms[1].running_mean = self.norms[0].running_mean  # a shared buffer
        self.scale = nn.Parameter(torch.ones(1, 4, 1, 1))
        self.tied = self.scale
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        for conv, norm in zip(self.convs, self.norms):
            x = conv(x)
            x = F.batch_norm(
                x, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.1, norm.eps
            )
            x = F.relu(x) * self.tied
        return self.head(x.mean((2, 3)))


def test_traced_graph_is_the_one_torch_fx_traces():
    model = FunctionalNorms().eval()
    assert trace_module.trace(model).code == fx.symbolic_trace(model).code


def test_tracing_lists_the_models_tensors_once(monkeypatch):
    model = FunctionalNorms(blocks=12).eval()
    calls = []
    for name in ("named_parameters", "named_buffers"):
        listing = getattr(model, name)
        monkeypatch.setattr(model, name, lambda *a, _l=listing, _n=name, **k: calls.append(_n) or _l(*a, **k))
    trace_module.trace(model)
    # once for the meta-device check, once for the name tables; torch.fx alone scans per read
    assert calls.count("named_buffers") <= 2 and calls.count("named_parameters") <= 2


def test_compile_runs_the_model_three_times_and_load_twice(tmp_path):
    torch.manual_seed(0)
    model = FunctionalNorms(blocks=2).double().eval()
    runs = []
    layouts = []
    model.convs[0].register_forward_hook(
        lambda module, args, out: (
            runs.append(args[0].shape[0])
            or layouts.append(args[0].is_contiguous(memory_format=torch.channels_last))
        )
    )
    engine = kfx.compile(model, SHAPE, kfx.Patch(4, stride=4))
    # the graph on one image (shape propagation, which is also the check's batch of one), the eager
    # model on a batch of two, and the graph on that batch in channels-last: the check and the
    # layout check in one run
    assert sorted(runs) == [1, 2, 2]
    assert layouts.count(True) == 1 and engine.compiled.channels_last
    engine.save(tmp_path / "e.kfx")
    runs.clear()
    kfx.load(tmp_path / "e.kfx", model)
    assert runs == [1, 1]  # shape propagation and the layout check: the fingerprint stands for the check


def naive_local_axis(inp: AxisBoxes, kernel, stride, padding, out_size, tau):
    outs = [
        thresholded_output_span(
            s, inp.width, kernel=kernel, stride=stride, padding=padding, out_size=out_size, tau=tau
        )
        for s in inp.starts
    ]
    reads = [read_in_span(o.start, o.width, kernel=kernel, stride=stride, padding=padding) for o in outs]
    return AxisBoxes(outs[0].width, tuple(o.start for o in outs)), AxisBoxes(
        reads[0].width, tuple(r.start for r in reads)
    )


@pytest.mark.parametrize("kernel, stride, padding", [(3, 1, 1), (3, 2, 1), (7, 2, 3), (2, 2, 0), (1, 1, 0)])
@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_box_tables_equal_the_per_coordinate_equations(kernel, stride, padding, tau):
    size, patch = 40, 6
    table = AxisBoxes(patch, tuple(range(size - patch + 1)))
    for _ in range(3):  # a chain of layers: later tables repeat starts
        out_size = (size + 2 * padding - kernel) // stride + 1
        spec = SimpleNamespace(kernel=(kernel,), stride=(stride,), padding=(padding,), kind="conv")
        got = _local_axis(table, spec, 0, out_size, tau)
        assert got == naive_local_axis(table, kernel, stride, padding, out_size, tau)
        table, size = got[0], out_size


def test_merge_tables_equal_the_per_coordinate_union():
    size = 30
    a = AxisBoxes(5, tuple(min(x // 2, size - 5) for x in range(50)))
    b = AxisBoxes(3, tuple(min((x * 3) // 5, size - 3) for x in range(50)))
    unions = [union_span([a.span(x), b.span(x)]) for x in range(50)]
    width = max(u.width for u in unions)
    expected = AxisBoxes(width, tuple(shift_inside(u.start, width, size) for u in unions))
    assert _merge_axis([a, b], size) == expected
    assert _merge_axis([a], size) == AxisBoxes(5, a.starts)
    assert isinstance(a.span(0), Span)
