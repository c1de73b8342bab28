"""``kfx.explain_dataset(..., runner="ray")``: an actor pool of explainers under Ray Data.

The driver lists the inputs (the same listing as the local run), Ray Data spreads them over a pool
of :class:`_RayExplainer` actors with ``map_batches`` (each actor compiles its engine once, with
``threads`` torch threads), and the driver writes the rows that come back with the local run's
:class:`kfx.dataset.Recorder`: the same Parquet parts, the same resume rule. Files must be readable
at the same paths on every node (a shared file system). A drill-down travels in the pickled
:class:`~kfx._dataset_explain.Setup`; per-image files (``png``/``npy``) are written by the driver
as rows come back.
"""

from __future__ import annotations

import os
import sys

from kfx import _dataset_io as io
from kfx.errors import InputError, KfxError

# Ray counts CPUs logically. An actor pool that reserves every CPU leaves none for Ray Data's own
# tasks, and the run stalls on a small machine; each actor reserves this share of its threads.
ACTOR_CPU_SHARE = 0.5
# One Ray block per input (up to this many), so actors take images one by one and rows reach the
# driver, which writes them, as soon as each is done; beyond it blocks hold several inputs.
MAX_BLOCKS = 4096
SKIPPED = "skipped"


class _RayExplainer:
    """One actor: the engine compiled once; rows for a batch of inputs."""

    def __init__(self, setup, done_keys: set, threads: int):
        import torch

        from kfx._dataset_explain import Explainer

        torch.set_num_threads(threads)
        self.done = done_keys
        self.explainer = Explainer(setup)

    def __call__(self, batch):
        """The rows of a batch of inputs, in order: skipped ones marked, the pending ones explained
        together (several small images share model batches, as in the local run)."""
        import pyarrow as pa

        rows: list[dict | None] = []
        pending, where = [], []
        for row in batch.to_pylist():
            item = io.Item(row["path"], io._target_text(row["target"]))
            content, to_explain = io.hash_if_pending(item, self.explainer.setup.requested(item), self.done)
            if to_explain:
                where.append(len(rows))
                rows.append(None)
                pending.append((item, content))
            else:
                rows.append({"path": item.path, "status": SKIPPED})
        for index, row in zip(where, self.explainer.explain_many(pending), strict=True):
            rows[index] = row
        return pa.Table.from_pylist(rows, schema=io.schema())


def _ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise KfxError("the Ray runner needs Ray Data: pip install 'kfx[ray]'") from None
    return ray


def _start(ray, address: str | None) -> bool:
    """Connect to Ray (or start a local one); True when this call started it (and must stop it)."""
    if ray.is_initialized():
        return False
    if address is None:
        # Actors import the model's module by name: give them this process's import path.
        path = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
        ray.init(include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    else:
        try:
            ray.init(address=address)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise InputError(f"cannot join the Ray cluster at {address!r}: {exc}") from None
    return True


def run_ray(setup, items, done_keys, recorder, address, actors, threads, progress) -> None:
    """Explain ``items`` on a Ray actor pool; rows go to ``recorder`` as they come back."""
    from kfx._dataset_explain import Explainer

    ray = _ray()
    # Compile once here first: a model or patch kfx refuses fails now with kfx's own message (an
    # actor's failing constructor reaches the driver as Ray's ActorDiedError, with the text only).
    # Its group size (small images share model batches) is each actor's batch of inputs.
    group = Explainer(setup).group_size
    started_here = _start(ray, address)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = progress
        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        pool = actors or max(1, int(cpus // threads))
        rows = [{"path": item.path, "target": item.target} for item in items]
        results = ray.data.from_items(rows, override_num_blocks=min(len(rows), MAX_BLOCKS)).map_batches(
            _RayExplainer,
            # One image per call (a map takes seconds, so actors balance image by image), or one
            # group of small images whose positions share model batches (kfx/_multi_image.py).
            batch_size=group,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=pool),
            fn_constructor_kwargs={"setup": setup, "done_keys": done_keys, "threads": threads},
            # Ray Data restarts a dead actor and retries its images (max_restarts=-1,
            # max_task_retries=-1 by default), so a lost worker costs time, not results.
            num_cpus=threads * ACTOR_CPU_SHARE,
        )
        for batch in results.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                if row["status"] == SKIPPED:
                    recorder.skip()
                else:
                    recorder.record(row)
    finally:
        if started_here:
            ray.shutdown()
