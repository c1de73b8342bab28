"""``kfx report`` (kfx/report.py): the HTML page about a results folder, checked against the Parquet
rows (counts, error rows, class groups, the outside-share ranking recomputed here without kfx), its
command-line errors, and the page itself in Debian's Chromium (offline, pictures drawn, sorting)."""

from __future__ import annotations

import csv
import html
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import kfx
import kfx.dataset
from kfx import cli
from kfx.report import drop_pixels
from tests.test_dataset import SIZE, TINY, explain, write_photos
from tests.test_serve import CHROMIUM, CHROMIUM_ARGS, wait_for_text

BORDER = 0.2
ODD_NAME = 'a<b>&"c.png'  # the page must show it as text, not as markup


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A results folder from the real explain_dataset: five photos (two with a requested target,
    one with a name full of HTML characters), a corrupt file and a missing one (error rows)."""
    root = tmp_path_factory.mktemp("report")
    paths = write_photos(root / "photos", 5)
    odd = paths[4].rename(paths[4].with_name(ODD_NAME))
    paths[4] = odd
    corrupt = root / "photos" / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    rows = [("path", "target"), (paths[0], 3), (paths[1], 5), *[(p, "") for p in paths[2:]]]
    rows += [(corrupt, ""), (root / "photos" / "missing.png", "")]
    with open(root / "list.csv", "w", newline="") as file:
        csv.writer(file).writerows(rows)
    explain(root / "list.csv", root / "out")
    page = root / "page.html"
    assert cli.main(["report", str(root / "out"), "-o", str(page), "--border", str(BORDER), "-q"]) == 0
    return root / "out", page


def parquet_rows(out: Path) -> list[dict]:
    tables = [pq.read_table(p) for p in sorted(out.glob("config-*/part-*.parquet"))]
    return pa.concat_tables(tables).to_pylist()


def pixel_drops(row: dict) -> np.ndarray:
    """The per-pixel drop, written out here: base minus each window's probability, averaged over
    the windows covering each pixel (0 where none does)."""
    values = np.array(row["map"], dtype=np.float64).reshape(row["map_shape"])
    (patch_h, patch_w), (stride_h, stride_w) = row["patch"], row["stride"]
    total, count = np.zeros(row["image_size"]), np.zeros(row["image_size"])
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            window = np.s_[i * stride_h : i * stride_h + patch_h, j * stride_w : j * stride_w + patch_w]
            total[window] += row["base_probability"] - values[i, j]
            count[window] += 1
    return total / np.maximum(count, 1)


@pytest.mark.parametrize(
    "patch, stride, size, holes",
    [
        ((8, 8), (4, 4), (32, 32), False),
        ((5, 3), (2, 4), (23, 18), True),
        ((16, 16), (8, 8), (224, 224), True),
    ],
)
def test_drop_pixels_equal_the_heatmaps_own_per_pixel_map(patch, stride, size, holes):
    """report.drop_pixels computes Heatmap.to_pixels another way: the same values, remainders at the
    bottom/right and unevaluated (NaN) cells included."""
    rng = np.random.default_rng(1)
    shape = ((size[0] - patch[0]) // stride[0] + 1, (size[1] - patch[1]) // stride[1] + 1)
    values = rng.random(shape).astype(np.float32)
    if holes:
        values[rng.random(shape) < 0.3] = np.nan
    row = {"status": "ok", "path": "p", "error": None, "fill": [0.0], "patch": patch, "stride": stride,
           "image_size": size, "map": values, "map_shape": shape, "target": 1, "base_probability": 0.7, "tau": 1.0}  # fmt: skip
    expected = kfx.dataset.heatmap(row).to_pixels().double().numpy()
    np.testing.assert_allclose(drop_pixels(row), expected, rtol=1e-6, atol=1e-7)
    if not holes:  # and the loop written out in this file
        np.testing.assert_allclose(drop_pixels(row), pixel_drops({**row, "map": values.ravel()}), atol=1e-12)


def outside_share(row: dict) -> float:
    drops = np.clip(pixel_drops(row), 0, None)
    band = round(BORDER * SIZE)
    inside = drops[band : SIZE - band, band : SIZE - band].sum()
    return (drops.sum() - inside) / drops.sum() if drops.sum() > 0 else float("nan")  # no drop: no share


def attributes(text: str, element: str, name: str) -> list[str]:
    return [html.unescape(v) for v in re.findall(rf'<{element} class="[^"]*"[^>]*? {name}="([^"]*)"', text)]


def test_counts_and_error_rows_match_the_parquet_rows(results):
    out, page = results
    text = page.read_text(encoding="utf-8")
    rows = parquet_rows(out)
    ok = [r for r in rows if r["status"] == "ok"]
    errors = [r for r in rows if r["status"] == "error"]
    assert (len(rows), len(ok), len(errors)) == (7, 5, 2)
    counts = [int(n) for n in re.findall(r'<b id="count-\d">(\d+)</b>', text)]
    requested = sum(r["requested_target"] is not None for r in rows)
    assert counts == [7, 5, 2, len({r["target"] for r in ok}), requested]
    errors_section = text[text.index('<section id="errors">') : text.index('<section id="classes">')]
    for row in errors:
        assert html.escape(row["error"], quote=True) in errors_section
        assert html.escape(Path(row["path"]).name) in errors_section
    assert "<script" not in errors_section and "src=" not in text.replace('src="data:image/png;base64,', "")


def test_mean_maps_are_one_per_explained_class_with_its_count(results):
    out, page = results
    text = page.read_text(encoding="utf-8")
    ok = [r for r in parquet_rows(out) if r["status"] == "ok"]
    expected = {}
    for row in ok:
        expected[row["target"]] = expected.get(row["target"], 0) + 1
    shown = dict(
        zip(
            map(int, attributes(text, "figure", "data-target")),
            map(int, attributes(text, "figure", "data-count")),
        )
    )
    assert shown == expected and {3, 5} <= set(shown)


def test_outside_share_ranking_equals_an_independent_computation(results):
    out, page = results
    text = page.read_text(encoding="utf-8")
    ok = [r for r in parquet_rows(out) if r["status"] == "ok"]
    shares = {r["path"]: outside_share(r) for r in ok}
    scored = [p for p in shares if not np.isnan(shares[p])]
    assert 0 < len(scored) < len(ok)  # a map without positive drop (a requested class) has no share
    expected = sorted(scored, key=lambda p: (-shares[p], p))
    assert attributes(text, "figure", "data-path") == expected
    for path, value in zip(expected, attributes(text, "figure", "data-outside")):
        assert float(value) == pytest.approx(shares[path], rel=1e-9)
    # the table's sort keys: the same share, and max/mean drop on the grid
    table = text[text.index('<table id="results"') :]
    for row in ok:
        cells = re.search(rf'data-sort="{re.escape(html.escape(row["path"]))}">.*?</tr>', table).group(0)
        keys = [float(k) if k else np.nan for k in re.findall(r'class="num" data-sort="([^"]*)"', cells)]
        base, values = row["base_probability"], np.array(row["map"], dtype=np.float64)
        expected_keys = [base, base - values.min(), base - values.mean(), shares[row["path"]]]
        assert keys == pytest.approx(expected_keys, nan_ok=True)


def test_cli_errors_name_the_problem(results, tmp_path, capsys):
    out, _ = results
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    no_rows = tmp_path / "no_rows"
    config = next(out.glob("config-*"))
    (no_rows / config.name).mkdir(parents=True)
    shutil.copy(config / "config.json", no_rows / config.name / "config.json")
    cases = {
        "missing": (["report", str(tmp_path / "missing")], 1, "no such folder"),
        "a file": (["report", str(tmp_path / "file.txt")], 1, "not a folder"),
        "empty": (["report", str(tmp_path / "empty")], 1, "no kfx results here"),
        "no rows": (["report", str(no_rows)], 1, "no result rows yet"),
        "border": (["report", str(out), "--border", "0.5"], 2, "fraction of the side in (0, 0.5)"),
        "top": (["report", str(out), "--top", "0"], 2, "--top"),
        "unwritable": (["report", str(out), "-o", str(tmp_path / "file.txt" / "r.html")], 1, "cannot write"),
    }
    for name, (argv, status, message) in cases.items():
        assert cli.main(argv) == status, name
        err = capsys.readouterr().err
        assert err.startswith("kfx: error: ") and message in err and err.count("\n") == 1, (name, err)


def test_the_page_says_when_the_maps_are_approximate(results, tmp_path):
    out, page = results
    assert 'id="approximate"' not in page.read_text()  # exact maps: nothing to say
    paths = write_photos(tmp_path / "photos", 2)
    explain(paths, tmp_path / "approx", drill_down=kfx.DrillDown(target_speedup=2))
    approximate = tmp_path / "approx.html"
    assert cli.main(["report", str(tmp_path / "approx"), "-o", str(approximate), "-q"]) == 0
    note = re.search(r'<p id="approximate">(.*?)</p>', approximate.read_text()).group(1)
    assert "drill-down" in note and "target_speedup=2" in note


def test_several_configurations_need_a_fingerprint(results, tmp_path, capsys):
    out, _ = results
    mixed = tmp_path / "mixed"
    shutil.copytree(out, mixed)
    other = write_photos(tmp_path / "more", 1)
    kfx.explain_dataset(other, TINY, kfx.Patch(8, stride=8), mixed, size=SIZE)
    assert cli.main(["report", str(mixed)]) == 1
    err = capsys.readouterr().err
    assert "2 configurations" in err and "--fingerprint" in err
    fingerprint = next(out.glob("config-*")).name.removeprefix("config-")
    assert cli.main(["report", str(mixed), "--fingerprint", fingerprint[:8]]) == 0
    assert capsys.readouterr().out == f"kfx report: wrote {mixed / 'report.html'}\n"
    assert '<b id="count-0">7</b>' in (mixed / "report.html").read_text()  # not the 1 of the other


# -- the page in a real browser -------------------------------------------------------------------

TABLE_ORDER = """column => Array.from(document.querySelectorAll('#results tbody tr'))
    .map(row => row.cells[column].dataset.sort ?? row.cells[column].textContent)"""


def sort_by(page, heading: str, direction: str, attempts: int = 3) -> None:
    """Click a heading until the table says it is sorted that way. A click on a page still
    settling can be lost on a loaded machine, so one not registered after 10 s is clicked again
    (the input is retried; the order it gives is checked once, by the caller)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    button = page.locator("#results thead button", has_text=heading)
    for _ in range(attempts):
        button.click()
        try:
            page.wait_for_function(
                "([heading, direction]) => Array.from(document.querySelectorAll('#results th'))"
                ".some(th => th.innerText.startsWith(heading) && th.getAttribute('aria-sort') === direction)",
                arg=[heading, direction],
                timeout=10_000,
            )
            return
        except PlaywrightTimeout:
            continue
    raise AssertionError(f"{attempts} clicks on {heading!r}, the table is not sorted {direction}")


@pytest.mark.skipif(
    CHROMIUM is None, reason="the browser test needs Debian's chromium (apt-get install chromium)"
)
def test_the_page_opens_offline_draws_its_pictures_and_sorts(results):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright")
    out, page_path = results
    ok = [r for r in parquet_rows(out) if r["status"] == "ok"]
    shares = {r["path"]: outside_share(r) for r in ok}
    scored = sorted((shares[p], p) for p in shares if not np.isnan(shares[p]))
    unscored = {r["path"] for r in parquet_rows(out)} - {p for _, p in scored}
    requests, problems = [], []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("request", lambda request: requests.append(request.url))
            page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda exc: problems.append(str(exc)))
            page.route(
                "**/*",
                lambda route: (
                    route.continue_() if route.request.url.startswith(("file:", "data:")) else route.abort()
                ),
            )
            page.goto(page_path.as_uri(), wait_until="load")
            images = page.eval_on_selector_all(
                "img", "images => images.map(i => [i.complete, i.naturalWidth, i.naturalHeight])"
            )
            classes = len({r["target"] for r in ok})
            assert len(images) == classes + len(scored)
            assert all(done and width > 0 and height > 0 for done, width, height in images)
            # the odd file name is text in the table, not markup
            assert ODD_NAME in page.locator("#results tbody").inner_text()

            # rows with a share in its order, then the rows without one (errors, no positive drop)
            sort_by(page, "outside share", "ascending")
            paths = page.evaluate(TABLE_ORDER, 0)
            assert paths[: len(scored)] == [p for _, p in scored] and set(paths[len(scored) :]) == unscored
            sort_by(page, "outside share", "descending")
            paths = page.evaluate(TABLE_ORDER, 0)
            assert paths[: len(scored)] == [p for _, p in scored][::-1]
            assert set(paths[len(scored) :]) == unscored
            sort_by(page, "image", "ascending")  # the names differ in their first letter: one order
            assert page.evaluate(TABLE_ORDER, 0) == sorted(unscored | {p for _, p in scored})
        finally:
            browser.close()
    assert all(url.startswith(("file:", "data:")) for url in requests), requests
    assert problems == []


# -- the explorer's Results page (kfx serve --results DIR) ------------------------------------------


def test_results_browser_lists_every_input_and_shows_its_stored_map(results):
    from kfx._serve_results import ResultsBrowser

    out, _ = results
    browser = ResultsBrowser(out, border=BORDER)
    rows = kfx.read_results(out)  # the same order: by path
    assert [index for _, index in browser.choices()] == list(range(len(rows)))
    shares = [
        outside_share(row) if row["status"] == "ok" else np.nan for row in parquet_rows_by_path(out, rows)
    ]
    top = max((s, -i) for i, s in enumerate(shares) if not np.isnan(s))
    assert browser.first() == -top[1]
    for i, row in rows.iterrows():
        picture, text = browser.show(i)
        assert html.escape(Path(row["path"]).name) in text
        if row["status"] == "ok":
            assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3
            assert ("none" if np.isnan(shares[i]) else f"{shares[i]:.3f}") in text
        else:
            assert picture is None and html.escape(row["error"]) in text
    table = browser.table()
    assert len(table) == len(rows)
    assert table["outside share"].tolist() == pytest.approx(np.round(shares, 4).tolist(), nan_ok=True)


def parquet_rows_by_path(out: Path, frame) -> list[dict]:
    by_path = {row["path"]: row for row in parquet_rows(out)}
    return [by_path[path] for path in frame["path"]]


def test_serve_refuses_a_results_folder_without_results_before_loading(tmp_path, capsys):
    pytest.importorskip("gradio", reason="kfx serve needs gradio: pip install 'kfx[ui]'")
    from tests.test_serve import free_port

    argv = ["serve", "--results", str(tmp_path / "missing"), "--port", str(free_port())]
    assert cli.main([*argv, "--model", "no_such_module:factory"]) == 1  # the folder fails first
    err = capsys.readouterr().err
    assert err.startswith("kfx: error: ") and "no such folder" in err


def choose_result(page, name: str, attempts: int = 3) -> None:
    """Pick ``name`` in the Results page's menu and wait until the details name it. A pick made
    while the page is still settling can be lost on a loaded machine, so one not shown after 15 s
    is made again (the input is retried, never a result)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for _ in range(attempts):
        page.click("#kfx-results-image input")
        page.get_by_role("option", name=name, exact=True).click()
        try:
            wait_for_text(page, "#kfx-results-details", name.removesuffix(" (error)"), timeout_s=15)
            return
        except PlaywrightTimeout:
            continue
    raise AssertionError(
        f"{attempts} picks of {name!r}: the page shows {page.inner_text('#kfx-results-details')!r}"
    )


@pytest.mark.skipif(
    CHROMIUM is None, reason="the browser test needs Debian's chromium (apt-get install chromium)"
)
def test_the_explorer_browses_a_results_folder(results):
    pytest.importorskip("gradio", reason="the explorer's page needs gradio: pip install 'kfx[ui]'")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright")
    from kfx._serve_results import ResultsBrowser
    from kfx.serve import launch
    from tests.serve_models import tiny_loaded
    from tests.test_serve import free_port, open_browser

    out, _ = results
    browser_view = ResultsBrowser(out)
    first = Path(browser_view.scores["path"][browser_view.first()]).name
    app = launch(
        tiny_loaded(64), host="127.0.0.1", port=free_port(), block=False, quiet=True, results=browser_view
    )
    try:
        with sync_api.sync_playwright() as playwright:
            browser, page = open_browser(playwright)
            page.goto(app.local_url + "results")
            wait_for_text(page, "#kfx-results-details", first, timeout_s=60)  # the top suspect first
            page.wait_for_function(
                "() => { const i = document.querySelector('#kfx-results-map img'); return i && i.naturalWidth > 0; }",
                timeout=30_000,
            )
            for name in browser_view.short.values():  # the table lists every input
                wait_for_text(page, "#kfx-results-table", name, timeout_s=30)
            choose_result(page, "corrupt.png (error)")
            wait_for_text(page, "#kfx-results-details", "error:")
            assert page.locator("#kfx-results-map img").count() == 0  # an error row has no map
            choose_result(page, ODD_NAME)
            page.wait_for_function(
                "() => { const i = document.querySelector('#kfx-results-map img'); return i && i.naturalWidth > 0; }",
                timeout=30_000,
            )
            browser.close()
    finally:
        app.close()
