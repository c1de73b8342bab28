"""kfx.common: the helpers several parts of kfx share (batch size, model dtype/device, pairs, progress)."""

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from kfx.common import DEFAULT_BATCH_SIZE, follow_progress, int_pair, model_dtype_device, progress_bar
from kfx.errors import InputError, PatchError


def test_default_batch_size_is_a_positive_int():
    assert isinstance(DEFAULT_BATCH_SIZE, int) and DEFAULT_BATCH_SIZE >= 1


@pytest.mark.parametrize(
    "value, pair",
    [
        (3, (3, 3)),
        ((16, 8), (16, 8)),
        ([4, 2], (4, 2)),
        ((5,), (5, 5)),  # torch's 2-d ops read a one-item sequence as both sides
        (np.int64(7), (7, 7)),
        ((np.int32(2), torch.tensor(3)), (2, 3)),
        (torch.Size([6, 9]), (6, 9)),
        (torch.tensor([1, 2]), (1, 2)),
        (0, (0, 0)),  # the range is the caller's to check
    ],
)
def test_int_pair_reads_ints_and_pairs(value, pair):
    got = int_pair(value, "size")
    assert got == pair and all(type(v) is int for v in got)


@pytest.mark.parametrize(
    "value", [True, (True, 2), 2.0, (2, 3.5), (1, 2, 3), (), "16", None, torch.tensor([1.0, 2.0]), {1, 2}]
)
def test_int_pair_refuses_anything_else_with_the_callers_error(value):
    with pytest.raises(InputError, match=r"stride must be an int or a pair of ints \(h, w\)"):
        int_pair(value, "stride")
    with pytest.raises(PatchError, match="patch size must be"):
        int_pair(value, "patch size", PatchError)


class _IntBufferFirst(nn.Module):
    """An integer buffer registered before the floating-point weights: it says nothing about inputs."""

    def __init__(self):
        super().__init__()
        self.register_buffer("steps", torch.zeros(2, dtype=torch.long))
        self.linear = nn.Linear(2, 2).to(torch.float64)


def test_model_dtype_device_is_the_first_floating_point_tensors():
    assert model_dtype_device(_IntBufferFirst()) == (torch.float64, torch.device("cpu"))
    norm = nn.BatchNorm2d(3, affine=False).half()  # buffers only
    assert model_dtype_device(norm) == (torch.float16, torch.device("cpu"))


def test_model_dtype_device_without_weights_is_the_default():
    assert model_dtype_device(nn.ReLU()) == (None, None)
    fallback = (torch.bfloat16, torch.device("meta"))
    assert model_dtype_device(nn.Sequential(nn.Flatten()), default=fallback) == fallback


def _steps(*counts, total=10):
    return [SimpleNamespace(done=done, total=total) for done in counts]


def test_follow_progress_moves_the_bar_to_each_count_and_returns_the_last_step():
    text = io.StringIO()
    bar = progress_bar("test", show=True, file=text)
    steps = _steps(2, 5, 10)
    assert follow_progress(iter(steps), bar) is steps[-1]
    assert (bar.n, bar.total) == (10, 10)
    assert "10/10" in text.getvalue()


def test_follow_progress_takes_a_total_that_changes_and_a_silent_bar():
    bar = progress_bar("test", show=True, file=io.StringIO())
    steps = _steps(3, total=4) + _steps(6, total=9)  # drill-down: stage 2 adds positions
    follow_progress(steps, bar)
    assert (bar.n, bar.total) == (6, 9)
    silent = progress_bar("test", show=False)
    assert follow_progress(_steps(4), silent).done == 4
    assert follow_progress([], progress_bar("test", show=False)) is None


def test_follow_progress_closes_the_bar_when_the_stream_fails():
    def failing():
        yield from _steps(1)
        raise RuntimeError("the model failed")

    bar = progress_bar("test", show=True, file=io.StringIO())
    with pytest.raises(RuntimeError, match="the model failed"):
        follow_progress(failing(), bar)
    assert bar.disable  # tqdm's close() disables the bar
