"""``kfx batch --ray`` with its driver killed mid-run: the parts it wrote stay whole, the local Ray it
started goes away with it, and a rerun explains each remaining image exactly once.

Its own module: the other Ray tests share one Ray started in-process, and this one needs the CLI to
start (and lose) its own."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from test_dataset import TESTS, TINY, rows_in_parts, write_photos

import kfx
from kfx.models import load_model, read_pixels

SIZE = 128
PATCH = kfx.Patch(4, stride=1)  # about 0.3 s an image: the kill lands while images are running
RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (Ray's GCS, raylet and workers below a driver that started it)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit():
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def command_line(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
    except OSError:
        return "?"


def left_running(pids: set[int], deadline: float) -> dict[int, str]:
    """Those of ``pids`` still running at ``deadline`` (monotonic seconds), with their command lines."""
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return {pid: command_line(pid) for pid in sorted(pids) if alive(pid)}


def test_the_driver_killed_midway_leaves_whole_parts_no_ray_behind_and_the_rerun_finishes(tmp_path):
    paths = write_photos(tmp_path / "photos", 16)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    args = ["batch", tmp_path / "photos", "--out", out, "--model", TINY, "--size", SIZE, "--patch", 4]
    args += ["--stride", 1, "--part-rows", 1, "-q", "--ray", "--threads", 1]
    log = tmp_path / "driver.log"  # a file, not a pipe: Ray's chatter must never block the driver
    with log.open("w") as output:
        driver = subprocess.Popen(
            [sys.executable, "-m", "kfx", *map(str, args)],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: whatever it leaves behind can be cleaned up
        )
    ray_processes: set[int] = set()
    try:
        deadline = time.monotonic() + 240
        while len(rows_in_parts(out)) < 2:
            assert driver.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the run wrote no parts:\n" + log.read_text()
            time.sleep(0.05)
        ray_processes = descendants(driver.pid)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        killed_at = time.monotonic()
        before = rows_in_parts(out)
        assert 2 <= len(before) < len(paths)  # killed midway, and every part it left is whole
        # The local Ray the driver started does not outlive it: its workers (which hold CPUs and
        # memory), raylet and GCS stop at once. Ray's two agents, which do none of the run's work,
        # exit once their GCS reconnect timeout (60 s) runs out: not waited for here.
        agents = {pid for pid in ray_processes if command_line(pid).startswith(RAY_AGENTS)}
        assert not left_running(ray_processes - agents, killed_at + 30)
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in ray_processes:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    resumed = kfx.explain_dataset(tmp_path / "photos", TINY, PATCH, out, size=SIZE)
    assert (resumed.skipped, resumed.done, resumed.failed) == (len(before), len(paths) - len(before), 0)
    rows = rows_in_parts(out)
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in paths)  # each exactly once
    loaded = load_model(TINY)
    engine = kfx.compile(loaded.model, (3, SIZE, SIZE), PATCH)
    for row in rows:
        expected = engine(loaded.prepare(read_pixels(row["path"]), SIZE)).values.ravel()
        torch.testing.assert_close(torch.tensor(row["map"]), expected, rtol=0, atol=1e-6)
