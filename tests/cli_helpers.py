"""What the command-line tests share: the tiny model's spec, the test photo, an in-process ``kfx``
run and the check that an error is one line.

A test module takes the fixtures by naming them (``image_file = cli_helpers.image_file``): pytest
finds fixtures among a module's names, and the autouse ``in_tmp_path`` then holds for that module
only. (Imported with ``from ... import``, a test's argument of the same name would read to linters
as a redefinition.)
"""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kfx import cli

TINY = "cli_models:tiny"  # tests/cli_models.py
SIZE = ["--size", "32"]


def write_photo(folder: Path) -> Path:
    """A small RGB PNG, not square (so that it is resized and cropped), at ``folder``/photo.png."""
    path = folder / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture
def image_file(tmp_path) -> Path:
    """The test photo, in the test's own folder."""
    return write_photo(tmp_path)


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """Default outputs land in the current directory: make it the test's own."""
    monkeypatch.chdir(tmp_path)


def run(capsys, *args):
    """``kfx ARGS`` in-process: (exit status, stdout, stderr)."""
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(err: str, *fragments: str) -> None:
    """``err`` is one line ``kfx: error: ...`` holding every fragment, and no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("kfx: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, err)
