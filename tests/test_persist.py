"""engine.save / kfx.load: a loaded engine is the engine kfx.compile builds, for the model it was saved for."""

import dataclasses
import io
import os

import pytest
import torch
from torch import nn

import kfx
import kfx.passes
import kfx.persist
from kfx.passes.plan import STATIC_CPU_RATES

# Rates under which dense evaluation looks slow: "auto" then keeps Net incremental, where this
# machine's or the static rates choose "full": a load that did not reuse the saved rates differs.
DENSE_IS_SLOW = dataclasses.replace(STATIC_CPU_RATES, op_seconds=1.0, source="test")

SHAPE = (3, 20, 20)
PATCH = kfx.Patch(6, stride=3)


class Net(nn.Module):
    """A small CNN with a branch, a merge, a pool and a global tail: every role the engine has."""

    def __init__(self, width: int = 6, act=nn.ReLU):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.act = act()
        self.branch = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.skip = nn.Conv2d(width, width, 1, stride=2)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(width, 5)

    def forward(self, x):
        y = self.act(self.bn(self.stem(x)))
        y = self.pool(self.branch(y) + self.skip(y))
        return self.head(y.mean((2, 3)))


def net(seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    model = Net(**kwargs).double()
    with torch.no_grad():  # non-trivial batch norm statistics
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def image(seed: int = 1) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def brute_force(model, img, patch):
    """The oracle: the model on every occluded copy, softmax of the unoccluded image's top class."""
    positions = kfx.grid_positions(img.shape[1:], patch)
    with torch.no_grad():
        target = model(img[None]).argmax(1)
        probs = torch.softmax(model(kfx.occlude(img, positions, patch)), 1)[:, target]
    return probs.view(patch.grid_shape(img.shape[1:]))


@pytest.fixture
def saved(tmp_path):
    model = net()
    engine = kfx.compile(model, SHAPE, PATCH, batch_size=7)
    path = tmp_path / "engine.kfx"
    engine.save(path)
    return model, engine, path


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"tau": 0.6},
        {"patch": kfx.Patch((4, 6), stride=(2, 5), fill=(0.5, -1.0, 2.0))},
        {"patch": kfx.Patch(5, stride=3, fill=torch.arange(75.0).view(3, 5, 5) / 75)},
        {"patch": kfx.Patch(6, stride=3, fill="mean_patch")},  # kfx's own position-dependent fills
        {"patch": kfx.Patch(6, stride=3, fill=kfx.fills.MeanImage(per_channel=False))},
        {"patch": kfx.Patch(6, stride=3, fill=kfx.fills.Blur(sigma=1.5, truncate=3.0))},
        {"patch": kfx.Patch(6, stride=3, fill=kfx.fills.Multiply.gaussian((6, 6)))},
        {"patch": kfx.Patch(6, stride=3, fill=kfx.fills.Baseline(torch.linspace(-1, 1, 1200).view(SHAPE)))},
        {"plan": "full"},
        {"plan": "auto", "plan_rates": DENSE_IS_SLOW},
        {"plan": "auto", "plan_rates": STATIC_CPU_RATES},
    ],
)
def test_loaded_engine_equals_compiled_engine_and_brute_force(tmp_path, options):
    model, img = net(), image()
    patch = options.pop("patch", PATCH)
    engine = kfx.compile(model, SHAPE, patch, **options)
    engine.save(tmp_path / "e.kfx")
    loaded = kfx.load(tmp_path / "e.kfx", model)

    expected, got = engine(img), loaded(img)
    assert torch.equal(got.values, expected.values)
    assert (got.target, got.base) == (expected.target, expected.base)
    assert repr(loaded) == repr(engine)
    assert loaded.cost() == engine.cost()
    assert loaded.memory == engine.memory
    assert loaded.batch_size == engine.batch_size and loaded.dtype == engine.dtype
    assert loaded.plan == engine.plan and loaded.dense_nodes == engine.dense_nodes
    assert (loaded.patch.size, loaded.patch.stride) == (patch.size, patch.stride)
    assert kfx.persist._same_fill(loaded.patch.fill, patch.fill)
    positions = torch.tensor([[0, 0], [7, 3], [SHAPE[1] - patch.size[0], SHAPE[2] - patch.size[1]]])
    with torch.no_grad():
        occluded = model(kfx.occlude(img, positions, patch))
    torch.testing.assert_close(loaded.outputs(img, positions), occluded, rtol=0, atol=1e-12)
    if options.get("tau", 1.0) == 1.0:
        torch.testing.assert_close(got.values, brute_force(model, img, patch), rtol=0, atol=1e-12)


def test_a_custom_fill_is_code_and_is_not_saved(tmp_path):
    class HalfBright(kfx.fills.PositionalFill):
        def content(self, image, positions, size):
            return kfx.fills.windows(image, positions, size) * 0.5

    engine = kfx.compile(net(), SHAPE, kfx.Patch(6, stride=3, fill=HalfBright()))
    with pytest.raises(kfx.PatchError, match=r"cannot store the fill .*HalfBright\(\)"):
        engine.save(tmp_path / "e.kfx")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_loading_skips_the_eager_check_but_compiling_runs_it(saved, monkeypatch):
    model, engine, path = saved
    calls = []
    monkeypatch.setattr(kfx.passes, "check_traced", lambda *args, **options: calls.append(args) or False)
    kfx.load(path, model)
    assert calls == []
    kfx.compile(model, SHAPE, PATCH)
    assert len(calls) == 1


def test_weights_changed_in_place_between_save_and_load(saved):
    model, _, path = saved
    model.load_state_dict(net(seed=5).state_dict())  # another checkpoint of the same architecture
    loaded, img = kfx.load(path, model), image(2)
    fresh = kfx.compile(model, SHAPE, PATCH, batch_size=7)
    assert torch.equal(loaded(img).values, fresh(img).values)
    torch.testing.assert_close(loaded(img).values, brute_force(model, img, PATCH), rtol=0, atol=1e-12)


def test_loading_for_another_instance_of_the_same_architecture(saved):
    _, _, path = saved
    other, img = net(seed=9), image(3)
    loaded = kfx.load(path, other)
    assert torch.equal(loaded(img).values, kfx.compile(other, SHAPE, PATCH)(img).values)


@pytest.mark.parametrize(
    "other, match",
    [
        (lambda: net(width=8), "parameters and buffers"),  # other shapes
        (lambda: net().float(), "parameters and buffers"),  # other dtype
        (lambda: net(act=nn.GELU), "submodules or their settings"),  # same tensors, another activation
        (lambda: nn.Sequential(net()).eval(), "parameters and buffers"),  # other paths
    ],
)
def test_a_model_that_does_not_match_is_refused(saved, other, match):
    _, _, path = saved
    with pytest.raises(kfx.ModelError, match=match):
        kfx.load(path, other())


class SigmoidNet(Net):
    """Net's modules and tensors, but another forward: only the traced code differs."""

    def forward(self, x):
        return super().forward(torch.sigmoid(x))


def test_a_model_with_another_forward_is_refused(saved):
    _, _, path = saved
    model = SigmoidNet().double().eval()
    model.load_state_dict(net().state_dict())
    with pytest.raises(kfx.ModelError, match="traced forward differs"):
        kfx.load(path, model)


class Block(nn.Module):
    def forward(self, x):
        return x * 2


class WithBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.block, self.head = nn.Conv2d(3, 4, 3), Block(), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.block(self.conv(x)).mean((2, 3)))


def test_leaf_modules_must_be_given_again(tmp_path):
    model = WithBlock().double().eval()
    engine = kfx.compile(model, SHAPE, PATCH, leaf_modules=(Block,))
    engine.save(tmp_path / "e.kfx")
    with pytest.raises(kfx.ModelError, match="Block; pass the same leaf_modules"):
        kfx.load(tmp_path / "e.kfx", model)
    loaded = kfx.load(tmp_path / "e.kfx", model, leaf_modules=(Block,))
    assert torch.equal(loaded(image()).values, engine(image()).values)


def test_expected_shape_and_patch_are_checked(saved):
    model, _, path = saved
    kfx.load(path, model, image_shape=SHAPE, patch=kfx.Patch(6, stride=3))  # what was saved
    with pytest.raises(kfx.InputError, match=r"shape \[3, 20, 20\], not \[3, 24, 24\]"):
        kfx.load(path, model, image_shape=(3, 24, 24))
    with pytest.raises(kfx.PatchError, match="compile one for that patch"):
        kfx.load(path, model, patch=kfx.Patch(6, stride=2))
    with pytest.raises(kfx.PatchError, match="compile one for that patch"):
        kfx.load(path, model, patch=kfx.Patch(6, stride=3, fill=1.0))


def test_a_tuned_engine_keeps_its_tuning(tmp_path):
    model = net()
    engine = kfx.compile(model, SHAPE, PATCH, tau=0.8)
    tuning = kfx.Tuning(
        taus=(1.0, 0.9, 0.8),
        ssim=((1.0, 0.99, 0.97),),
        mean=(1.0, 0.99, 0.97),
        lower=(1.0, 0.99, 0.97),
        fit=(0.1, -0.2, 1.1),
        target_ssim=0.95,
        quantile=0.1,
        tau=0.8,
        paper_tau=0.75,
        candidates=(("exact", 0.8, 1.5),),
    )
    tuned = type(engine)(model, dataclasses.replace(engine.compiled, tuning=tuning))
    tuned.save(tmp_path / "e.kfx")
    loaded = kfx.load(tmp_path / "e.kfx", model)
    assert loaded.tuning == tuning and loaded.tau == 0.8


def _write_record(path, change):
    record = torch.load(path, weights_only=True)
    change(record)
    torch.save(record, path)


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda p: p.write_bytes(b"not a torch file"), "not a kfx engine file, or it is damaged"),
        (lambda p: p.write_bytes(p.read_bytes()[:100]), "not a kfx engine file, or it is damaged"),
        (lambda p: torch.save({"weights": torch.zeros(2)}, p), r"not a kfx engine file \(saved by"),
        (lambda p: torch.save([1, 2], p), r"not a kfx engine file \(saved by"),
        (lambda p: _write_record(p, lambda r: r.update(format_version=0)), "engine format 0"),
        (lambda p: _write_record(p, lambda r: r.update(kfx_version="0.0.1")), "saved by kfx 0.0.1"),
        (lambda p: _write_record(p, lambda r: r.pop("arguments")), "damaged kfx engine file"),
        (
            lambda p: _write_record(p, lambda r: r["arguments"].update(dtype="load")),
            "damaged kfx engine file",
        ),
        (lambda p: _write_record(p, lambda r: r["fingerprint"].pop("code")), "damaged kfx engine file"),
    ],
)
def test_damaged_foreign_or_old_files_are_refused(saved, damage, match):
    model, _, path = saved
    damage(path)
    with pytest.raises(kfx.InputError, match=match):
        kfx.load(path, model)


class Payload:
    def __reduce__(self):
        return (os.system, ("echo kfx-test-should-never-run",))


def test_a_file_with_code_in_it_is_refused_without_running_it(tmp_path, capfd):
    buffer = io.BytesIO()
    torch.save({"format": kfx.persist.FORMAT, "payload": Payload()}, buffer)
    (tmp_path / "evil.kfx").write_bytes(buffer.getvalue())
    with pytest.raises(kfx.InputError, match="not a kfx engine file, or it is damaged"):
        kfx.load(tmp_path / "evil.kfx", net())
    assert "kfx-test-should-never-run" not in capfd.readouterr().out


def test_wrong_paths(saved, tmp_path):
    model, engine, _ = saved
    with pytest.raises(kfx.InputError, match="no engine file at"):
        kfx.load(tmp_path / "missing.kfx", model)
    with pytest.raises(kfx.InputError, match="is a directory"):
        engine.save(tmp_path)
    with pytest.raises(kfx.InputError, match="does not exist"):
        engine.save(tmp_path / "no" / "such" / "e.kfx")
    with pytest.raises(kfx.ModelError, match="torch.nn.Module"):
        kfx.load(tmp_path / "missing.kfx", "not a model")
    assert [p.name for p in tmp_path.iterdir()] == ["engine.kfx"]  # no temporary files left behind


def test_saving_replaces_a_file_atomically(saved):
    model, engine, path = saved
    other = kfx.compile(model, SHAPE, kfx.Patch(4, stride=4))
    other.save(path)
    assert kfx.load(path, model).patch.size == (4, 4)


@pytest.mark.parametrize("shape", [(2, 30), (2, 8, 10, 12)])
def test_signals_and_volumes_round_trip(tmp_path, shape):
    conv, pool = {2: (nn.Conv1d, nn.AdaptiveAvgPool1d), 4: (nn.Conv3d, nn.AdaptiveAvgPool3d)}[len(shape)]
    torch.manual_seed(0)
    model = nn.Sequential(conv(2, 4, 3, padding=1), nn.ReLU(), conv(4, 4, 3, stride=2), pool(1), nn.Flatten())
    model = nn.Sequential(model, nn.Linear(4, 3)).double().eval()
    engine = kfx.compile(model, shape, kfx.Patch(4, stride=2))
    engine.save(tmp_path / "e.kfx")
    loaded = kfx.load(tmp_path / "e.kfx", model, image_shape=shape, patch=kfx.Patch(4, stride=2))
    signal = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert loaded.patch.size == engine.patch.size == (4,) * (len(shape) - 1)
    assert torch.equal(loaded(signal).values, engine(signal).values)
