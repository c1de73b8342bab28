"""The explorer's page under load, and pages that go away mid-run (issue #14, item 10).

One server on 127.0.0.1 with the tiny model of tests/serve_models.py, driven by headless Chromium
through Playwright (no other address is reachable from the pages):

- a page that closes while its NeuroMask run computes: the run stops at its next optimisation
  step (counted in model calls), not at the end of its 150 steps, and leaves nothing running;
- four pages at once, each with its own photo and patch: upload, exact map, a naive map stopped
  midway, a full naive map (one page instead closes during a NeuroMask run). Every map the server
  computed, finished or stopped, is checked against ``kfx.compile`` on the same model and the same
  image file, each page's runs table lists only its own runs, and afterwards no run is computing
  and the model is no longer called.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

import kfx
from kfx import _serve_core as core
from kfx.models import read_pixels
from tests.serve_models import tiny_loaded
from tests.test_serve import CHROMIUM, CHROMIUM_ARGS, SIZE, SLIDER_HOLDS, calls_settle, free_port, serve

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="the browser tests need Debian's chromium (apt-get install chromium)"
)

NEUROMASK_STEPS = 150  # the page's default
TIMEOUT_MS = 60_000  # any one wait in a page; a run may queue behind the other pages' runs


class RecordingExplorer(core.Explorer):
    """An explorer that keeps the last map of every patch run, finished or stopped, for the checks."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.maps: list[tuple[core.Photo, core.MapSettings, kfx.Heatmap, bool]] = []

    def run(self, photo, layers, settings, *args):
        last, finished = None, False
        try:
            for frame in super().run(photo, layers, settings, *args):
                last = frame.heatmap if frame.heatmap is not None else last
                finished = finished or frame.record is not None
                yield frame
        finally:
            if last is not None:
                self.maps.append((photo, settings, last, finished))


@pytest.fixture(scope="module")
def server():
    """(app, explorer, loaded model) served on a free loopback port for this module's tests."""
    pytest.importorskip("gradio", reason="the explorer's page needs gradio: pip install 'kfx[ui]'")
    pytest.importorskip("playwright.async_api", reason="the browser tests need playwright")
    loaded = tiny_loaded(SIZE)
    explorer = RecordingExplorer(loaded, batch_size=64)
    app = serve(loaded, free_port(), explorer=explorer)
    try:
        yield app, explorer, loaded
    finally:
        app.close()


class SlowModel:
    """Counts the model's calls and makes each take ``seconds``, so that runs last long enough to be
    stopped or left midway; the calls are what the tests count, never the time."""

    def __init__(self, model: torch.nn.Module, seconds: float):
        self.calls: list[int] = []
        self.seconds = seconds
        self._lock = threading.Lock()
        self._hook = model.register_forward_pre_hook(self._called)

    def _called(self, _module, _inputs):
        with self._lock:
            self.calls.append(1)
        time.sleep(self.seconds)

    async def wait_for(self, count: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.calls) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert len(self.calls) >= count, f"the model was called {len(self.calls)} times, not {count}"

    def remove(self) -> None:
        self._hook.remove()


def wait_until_no_run_is_active(explorer: core.Explorer, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while explorer.active_runs and time.monotonic() < deadline:
        time.sleep(0.2)
    assert explorer.active_runs == 0, f"{explorer.active_runs} run(s) still computing"


# -- driving pages (Playwright's async API: the four pages act at the same time) --------------------


async def open_page(browser, url: str):
    """A page in a context of its own (its own Gradio session), that reaches only 127.0.0.1."""
    context = await browser.new_context(viewport={"width": 1400, "height": 1150})

    async def loopback_only(route):
        if route.request.url.startswith(("http://127.0.0.1", "data:", "blob:")):
            await route.continue_()
        else:
            await route.abort()

    await context.route("**/*", loopback_only)
    page = await context.new_page()
    await page.goto(url)
    await wait_for_text(page, "#kfx-prediction", "tiny class")  # the first sample loaded
    return context, page


async def page_state(page) -> str:
    """What the page shows, for a failure message."""
    status, message = await page.inner_text("#kfx-status"), await page.inner_text("#kfx-message")
    return f"status {status!r}, message {message!r}, runs {await runs_rows(page)}"


async def wait_in_page(page, condition: str, arg, what: str) -> None:
    """Wait for a JavaScript ``condition`` (a function of ``arg``); on a timeout, say what the page shows."""
    from playwright.async_api import TimeoutError as PlaywrightTimeout

    try:
        await page.wait_for_function(condition, arg=arg, timeout=TIMEOUT_MS)
    except PlaywrightTimeout:
        raise AssertionError(f"waited in vain for {what}: {await page_state(page)}") from None


async def wait_for_text(page, selector: str, text: str) -> None:
    await wait_in_page(
        page,
        "([s, t]) => { const e = document.querySelector(s); return e && e.innerText.includes(t); }",
        [selector, text],
        f"{text!r} in {selector}",
    )


async def set_slider(page, elem_id: str, value, attempts: int = 5) -> None:
    """Type ``value`` until the slider holds it: a Run clicked earlier sends the old value, and a value
    typed while the page is still settling can be lost, so it is typed again after a few seconds."""
    from playwright.async_api import TimeoutError as PlaywrightTimeout

    number = page.locator(f"#{elem_id} input[type=number]")
    for _ in range(attempts):
        await number.fill(str(value))
        await number.press("Enter")
        try:
            await page.wait_for_function(SLIDER_HOLDS, arg=[elem_id, value], timeout=3_000)
            return
        except PlaywrightTimeout:
            continue
    raise AssertionError(f"slider {elem_id} never held {value}: {await page_state(page)}")


async def choose_mode(page, mode: str) -> None:
    await page.locator("#kfx-mode label").filter(has_text=mode).click()


async def upload(page, path) -> None:
    """Upload ``path`` and wait until the page shows it (the sample menu then names no sample)."""
    async with page.expect_file_chooser() as chooser:
        await page.click("#kfx-upload")
    await (await chooser.value).set_files(str(path))
    await wait_in_page(
        page, "() => document.querySelector('#kfx-sample input').value === ''", None, f"{path.name} shown"
    )


async def upload_with_settings(
    page, path, patch: int, stride: int, grid_text: str, attempts: int = 3
) -> None:
    """Upload ``path``, set the patch and stride, and wait for the grid to count the positions. With
    four pages uploading at once, Chromium once dropped an upload mid-request (the server logged a
    ClientDisconnect and the page never got the photo), so a grid that has not updated after 20 s
    gets the upload again, as a user would."""
    from playwright.async_api import TimeoutError as PlaywrightTimeout

    condition = "([s, t]) => { const e = document.querySelector(s); return e && e.innerText.includes(t); }"
    for _ in range(attempts):
        await upload(page, path)
        await set_slider(page, "kfx-patch", patch)
        await set_slider(page, "kfx-stride", stride)
        try:
            await page.wait_for_function(condition, arg=["#kfx-grid", grid_text], timeout=20_000)
            return
        except PlaywrightTimeout:
            continue
    raise AssertionError(
        f"{path.name} uploaded {attempts} times, the grid never said {grid_text!r}: {await page_state(page)}"
    )


async def runs_rows(page) -> list[list[str]]:
    rows = page.locator("#kfx-runs tbody tr")
    return [
        [c.strip() for c in await rows.nth(i).locator("td").all_inner_texts()]
        for i in range(await rows.count())
    ]


async def run_to_the_end(page, rows_before: int) -> list[str]:
    """Press Run, wait for the run's row in the runs table, and return it."""
    await page.click("#kfx-run")
    await wait_in_page(
        page,
        "n => document.querySelectorAll('#kfx-runs tbody tr').length > n",
        rows_before,
        "a new row of runs",
    )
    return (await runs_rows(page))[rows_before]


# -- a page that goes away --------------------------------------------------------------------------


def test_closing_the_page_stops_its_neuromask_run_at_the_next_step(server):
    from playwright.async_api import async_playwright

    app, explorer, loaded = server
    slow = SlowModel(loaded.model, seconds=0.1)  # 150 steps would take 15 s

    async def start_a_run_and_leave() -> int:
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            context, page = await open_page(browser, app.local_url)
            await choose_mode(page, "NeuroMask")
            await page.click("#kfx-run")
            await wait_for_text(page, "#kfx-status", "NeuroMask: running")
            await slow.wait_for(len(slow.calls) + 3)  # a few optimisation steps have run
            await context.close()
            calls_at_close = len(slow.calls)
            await browser.close()
            return calls_at_close

    try:
        calls_at_close = asyncio.run(start_a_run_and_leave())
        settled = calls_settle(slow.calls, timeout_s=10)
    finally:
        slow.remove()
    # The step in flight and the few that start before the page's departure reaches the run
    # (a generous margin for a busy machine), not the 150 steps asked for.
    assert settled < calls_at_close + 25 < NEUROMASK_STEPS
    wait_until_no_run_is_active(explorer)


# -- four pages at once -----------------------------------------------------------------------------

# (photo, patch, stride) per page: each page's maps have their own image and grid.
SESSIONS = [("chelsea", 16, 4), ("coffee", 12, 4), ("astronaut", 16, 8), ("rocket", 8, 4)]
LEAVES_DURING_NEUROMASK = 3  # this page closes while its NeuroMask run computes


def grid_cells(patch: int, stride: int) -> int:
    side = (SIZE - patch) // stride + 1
    return side * side


async def one_session(browser, url: str, index: int, path) -> list[list[str]]:
    """One user: upload a photo, set the patch, run an exact map, stop a naive map midway, run a full
    naive map (or leave during a NeuroMask run); returns the page's runs table."""
    _, patch, stride = SESSIONS[index]
    context, page = await open_page(browser, url)
    cells = grid_cells(patch, stride)
    await upload_with_settings(page, path, patch, stride, f"= {cells:,} patch positions")
    await page.get_by_text("More settings").click()  # the batch slider sits in a closed accordion

    exact = await run_to_the_end(page, 0)
    assert exact[1:5] == ["Exact", path.name, f"{patch} / {stride}", f"{cells:,}"]

    await choose_mode(page, "Naive")
    await set_slider(page, "kfx-batch", 1)  # one position per batch: long enough to stop midway
    await page.click("#kfx-run")
    await wait_for_text(page, "#kfx-status", "Naive: running")
    await page.click("#kfx-stop")
    await wait_for_text(page, "#kfx-status", "Stopped")

    if index == LEAVES_DURING_NEUROMASK:
        await choose_mode(page, "NeuroMask")
        await page.click("#kfx-run")
        await wait_for_text(page, "#kfx-status", "NeuroMask: running")
        await context.close()
        return [exact]

    await set_slider(page, "kfx-batch", 64)
    naive = await run_to_the_end(page, 1)
    assert naive[1:5] == ["Naive", path.name, f"{patch} / {stride}", f"{cells:,}"]
    rows = await runs_rows(page)
    await context.close()
    return rows


def engine_map(loaded, path, patch: int, stride: int, target: int) -> tuple[kfx.Heatmap, int]:
    """The oracle: kfx.compile's map of the image file (read here, not by the page) and the class
    the model predicts on it."""
    image = loaded.prepare(read_pixels(str(path)), SIZE)
    gray = loaded.normalize(torch.full((3, 1, 1), 0x80 / 255)).view(-1)  # the page's default #808080
    engine = kfx.compile(loaded.model, (3, SIZE, SIZE), kfx.Patch(patch, stride, fill=tuple(gray.tolist())))
    with torch.no_grad():
        predicted = int(loaded.model(image[None]).argmax())
    return engine(image, target), predicted


def test_four_sessions_at_once_get_their_own_exact_maps_and_leave_nothing_running(server, tmp_path):
    from PIL import Image
    from playwright.async_api import async_playwright

    app, explorer, loaded = server
    paths = []
    for index, (photo, _, _) in enumerate(SESSIONS):
        paths.append(tmp_path / f"page{index}-{photo}.png")
        Image.fromarray(core.sample_photo(photo).pixels).save(paths[-1])
    slow = SlowModel(loaded.model, seconds=0.03)
    explorer.maps.clear()

    async def all_sessions():
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                return await asyncio.gather(
                    *(one_session(browser, app.local_url, i, path) for i, path in enumerate(paths))
                )
            finally:
                await browser.close()

    try:
        tables = asyncio.run(all_sessions())
        wait_until_no_run_is_active(explorer)
        calls_settle(slow.calls, timeout_s=10)  # and the model is no longer called
    finally:
        slow.remove()

    # Each page's table holds its own runs only (exact, then a full naive map; the stopped one has no row).
    for index, table in enumerate(tables):
        expected = ["Exact"] if index == LEAVES_DURING_NEUROMASK else ["Exact", "Naive"]
        assert [row[1] for row in table] == expected and {row[2] for row in table} == {paths[index].name}

    # Every map computed, finished or stopped, against the engine on the same image file.
    by_name = {path.name: (path, *SESSIONS[i][1:]) for i, path in enumerate(paths)}
    finished = {name: 0 for name in by_name}
    stopped = {name: 0 for name in by_name}
    for photo, settings, heatmap, done in explorer.maps:
        path, patch, stride = by_name[photo.name]
        assert (int(settings.patch), int(settings.stride)) == (patch, stride)
        expected, predicted = engine_map(loaded, path, patch, stride, heatmap.target)
        assert heatmap.target == predicted  # the pages explain the predicted class
        evaluated = heatmap.evaluated
        assert evaluated.all() if done else 0 < int(evaluated.sum()) < evaluated.numel()
        torch.testing.assert_close(
            heatmap.values[evaluated], expected.values[evaluated], rtol=1e-4, atol=1e-5
        )
        assert np.isnan(heatmap.values[~evaluated].numpy()).all()
        finished[photo.name] += done
        stopped[photo.name] += not done
    leaver = paths[LEAVES_DURING_NEUROMASK].name
    assert finished == {name: 1 if name == leaver else 2 for name in by_name}
    assert stopped == {name: 1 for name in by_name}
