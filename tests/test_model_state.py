"""Changes to the caller's model after kfx.compile: refused where the traced graph cannot follow
them, followed where only the caller's eager model runs.

The traced graph holds a module's plain settings (a Python number, a function, a list of them) as
constants, and ran the hooks that were there when it was traced: an engine that runs it refuses a
change with a ModelError. plan="full" runs the caller's model itself, so it follows the change
like kfx.NaiveEngine, recomputing its cached unoccluded output. Every change below gave a silently
wrong map before (measured: errors of 0.02-0.05 in a [0, 1]-scale output incrementally, and, for
hooks, under plan="full" through the stale cached unoccluded output). The oracle is torch itself:
the model on the occluded images before and after the change, so each test also shows that the
change does change the answer (the check is not idle).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import register_module_forward_hook

import kfx
import kfx.captum

captum_attr = pytest.importorskip("captum.attr")

IMAGE = (2, 9, 11)
PATCH = kfx.Patch(3, stride=2, fill=0.25)
PLANS = ["incremental", "full"]


class Scaled(nn.Module):
    """A traced-through block whose forward reads plain settings: a number, a function, a list and a
    dict of numbers; and keeps a cache (a list of tensors) that is not a setting."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.scale = 2.0
        self.activation = F.relu
        self.weights = [1.0, 0.5]
        self.options = {"divisor": 2.0}
        self.cache = [torch.zeros(1)]

    def forward(self, x):
        return self.activation(self.conv(x) * self.scale * self.weights[1] / self.options["divisor"])


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Scaled()
        self.head = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x):
        return self.head(self.block(x)).mean((2, 3))


def net() -> Net:
    torch.manual_seed(0)
    return Net().double().eval()


def image() -> torch.Tensor:
    return torch.randn(IMAGE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


# every position of the stride-2 grid, incl. the last row and column
POSITIONS = torch.tensor([(i, j) for i in range(0, IMAGE[1] - 2, 2) for j in range(0, IMAGE[2] - 2, 2)])


def brute_force(model: nn.Module, picture: torch.Tensor) -> torch.Tensor:
    """The model's outputs on every occluded image, one torch forward each."""
    with torch.no_grad():
        return torch.cat([model(kfx.occlude(picture, p[None], PATCH)) for p in POSITIONS])


def compiled_and_checked(model: nn.Module, plan: str) -> tuple[kfx.Engine, torch.Tensor]:
    """An engine for ``model`` that is exact before the change (its base activations now cached)."""
    engine = kfx.compile(model, IMAGE, PATCH, batch_size=8, plan=plan)
    picture = image()
    expected = brute_force(model, picture)
    torch.testing.assert_close(engine.outputs(picture, POSITIONS), expected, rtol=1e-12, atol=1e-12)
    return engine, expected


def refused_or_followed(model, engine, expected, match):
    """Refused by an engine that runs the traced program; followed by plan="full", whose heat map
    (with its unoccluded output) is then the eager model's, as kfx.NaiveEngine computes it."""
    picture = image()
    changed = brute_force(model, picture)
    assert (changed - expected).abs().max() > 1e-3, "the change does not change the map: a weak test"
    if engine.plan.chosen != "full":
        with pytest.raises(kfx.ModelError, match=match):
            engine.outputs(picture, POSITIONS)
        return
    torch.testing.assert_close(engine.outputs(picture, POSITIONS), changed, rtol=1e-12, atol=1e-12)
    ours, naive = engine(picture), kfx.NaiveEngine(model, IMAGE, PATCH)(picture)
    assert ours.target == naive.target and ours.base == pytest.approx(naive.base, rel=1e-12)
    torch.testing.assert_close(ours.values, naive.values, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize(
    "setting, value",
    [("scale", 3.0), ("activation", F.gelu), ("weights", [1.0, 2.0])],
    ids=["a number", "a function", "a list replaced"],
)
def test_a_changed_setting_of_a_traced_through_module_is_refused_or_followed(plan, setting, value):
    model = net()
    engine, expected = compiled_and_checked(model, plan)
    setattr(model.block, setting, value)
    refused_or_followed(model, engine, expected, f"'block' changed its setting {setting}.*[Cc]ompile again")


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("container", ["weights", "options"], ids=["a list", "a dict"])
def test_a_list_or_dict_of_settings_edited_in_place_is_refused_or_followed(plan, container):
    model = net()
    engine, expected = compiled_and_checked(model, plan)
    held = getattr(model.block, container)
    held[1 if container == "weights" else "divisor"] = -3.0
    refused_or_followed(model, engine, expected, f"'block' changed its setting {container}.*-3.0")


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("where", ["block.conv", "block", "head"])
def test_a_hook_added_after_compiling_is_refused_or_followed(plan, where):
    model = net()
    engine, expected = compiled_and_checked(model, plan)
    with model.get_submodule(where).register_forward_hook(lambda module, args, out: out * 3):
        refused_or_followed(model, engine, expected, f"'{where}'.*forward hooks")
    picture = image()  # the hook gone, the engine is exact again
    torch.testing.assert_close(engine.outputs(picture, POSITIONS), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("plan", PLANS)
def test_a_pre_hook_and_a_global_hook_added_after_compiling_are_refused_or_followed(plan):
    model = net()
    engine, expected = compiled_and_checked(model, plan)
    with model.head.register_forward_pre_hook(lambda module, args: (args[0].flip(-1),)):
        refused_or_followed(model, engine, expected, "'head'.*forward hooks")
    with register_module_forward_hook(lambda module, args, out: out + 1 if module is model.head else None):
        refused_or_followed(model, engine, expected, "global forward hooks")


def test_a_hook_removed_and_another_added_is_refused():
    """Same number of hooks, different hooks: the check compares hook ids, not counts."""
    model = net()
    first = model.head.register_forward_hook(lambda module, args, out: out)
    engine, expected = compiled_and_checked(model, "incremental")
    first.remove()
    with model.head.register_forward_hook(lambda module, args, out: out * 3):
        refused_or_followed(model, engine, expected, "'head'.*forward hooks")


def test_an_unchanged_model_runs_and_reassigning_an_equal_setting_is_not_a_change():
    model = net()
    engine, expected = compiled_and_checked(model, "incremental")
    model.block.scale = 2  # equal to 2.0: the graph computes the same
    model.block.activation = F.relu
    model.block.weights = [1.0, 0.5]  # another list, equal
    model.block.cache.append(torch.ones(1))  # a cache of tensors is not a setting
    torch.testing.assert_close(engine.outputs(image(), POSITIONS), expected, rtol=1e-12, atol=1e-12)


def test_the_captum_drop_in_recompiles_after_a_setting_change():
    """kfx.captum caches engines per model: a changed setting must give Captum's new answer, not an
    error and not the old map."""
    model = net()
    images = image()[None]
    kwargs = dict(sliding_window_shapes=(2, 3, 3), strides=(2, 2, 2), baselines=0.25, target=1)
    occlusion = kfx.captum.Occlusion(model)
    occlusion.attribute(images, **kwargs)
    model.block.scale = -1.5
    with model.head.register_forward_hook(lambda module, args, out: out * 3):
        got = occlusion.attribute(images, **kwargs)
        expected = captum_attr.Occlusion(model).attribute(images, **kwargs)
    assert occlusion.last_fallback_reason is None
    torch.testing.assert_close(got, expected.to(got.dtype), rtol=1e-5, atol=1e-6)
