import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# "ci": reproducible and bounded; "thorough": many more examples (HYPOTHESIS_PROFILE=thorough).
settings.register_profile(
    "ci", derandomize=True, max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

# Subprocesses (the CLI tests) compile with the default plan="auto": static rates keep their plan
# choice the same on every machine and skip the one-off calibration.
os.environ.setdefault("KFX_PLAN_CALIBRATE", "0")


@pytest.fixture(autouse=True, scope="session")
def _library_default_plan():
    """In-process tests check the incremental program against an oracle, so kfx.compile's default
    plan is pinned to "incremental" for the whole session (module-scoped fixtures compile too):
    under "auto", an engine that measures plain inference faster (any tiny test model on a large
    grid) would run it instead, and those tests would compare full inference with full inference.
    Yields the library's own default; tests/test_measured_plan.py tests it."""
    import kfx.engine

    library_default = kfx.engine.DEFAULT_PLAN
    kfx.engine.DEFAULT_PLAN = "incremental"
    yield library_default
    kfx.engine.DEFAULT_PLAN = library_default


@pytest.fixture(autouse=True)
def _library_defaults_when_marked(request, monkeypatch, _library_default_plan):
    """``@pytest.mark.library_defaults``: this test compiles with kfx.compile's own default plan."""
    if request.node.get_closest_marker("library_defaults") is not None:
        import kfx.engine

        monkeypatch.setattr(kfx.engine, "DEFAULT_PLAN", _library_default_plan)
