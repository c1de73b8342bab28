"""``kfx``'s failures outside its own code: a broken ``--model`` module, Ctrl-C, an unexpected error.

Each is one line ``kfx: error: ...`` that says what was wrong and what to do, never a traceback, with
exit status 1 (runtime) or 130 (interrupted). The broken modules are written into tmp_path, which is
put on sys.path.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kfx import cli
from tests import cli_helpers
from tests.cli_helpers import SIZE, TINY, assert_one_line_error, run

image_file, in_tmp_path = cli_helpers.image_file, cli_helpers.in_tmp_path  # fixtures

KFX_ROOT = str(Path(cli.__file__).resolve().parents[2])  # the kfx under test, in the child process too


@pytest.fixture
def module_dir(tmp_path, monkeypatch):
    """A folder on sys.path for the test's own modules; they are forgotten afterwards."""
    folder = tmp_path / "modules"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(folder)):
            del sys.modules[name]


def write_module(folder, name: str, source: str):
    (folder / f"{name}.py").write_text(textwrap.dedent(source))


# -- --model modules that cannot give a model -----------------------------------------------------------

BROKEN = {
    "syntax": (
        "syntax_error_models",
        "import torch\ndef build(:\n    pass\n",
        "build",
        ["syntax error in", "syntax_error_models.py, line 2", "fix the file"],
    ),
    "raises_at_import": (
        "raising_models",
        "raise RuntimeError('the config file is missing')\n",
        "build",
        [
            "importing module 'raising_models' failed",
            "RuntimeError: the config file is missing",
            "python -c 'import raising_models'",
        ],
    ),  # fmt: skip
    "missing_dependency": (
        "needy_models",
        "import kfx_test_no_such_dependency\n",
        "build",
        ["cannot import module 'needy_models'", "kfx_test_no_such_dependency"],
    ),
    "factory_raises": (
        "failing_factory_models",
        "def build():\n    raise ValueError('no weights for this size')\n",
        "build",
        [
            "build() raised ValueError: no weights for this size",
            "python -c 'import failing_factory_models; failing_factory_models.build()'",
        ],
    ),  # fmt: skip
    "factory_needs_arguments": (
        "argument_models",
        "def build(num_classes, depth=3):\n    pass\n",
        "build",
        ["build() needs arguments (num_classes)", "without arguments"],
    ),
    "keyword_only_arguments": (
        "keyword_models",
        "def build(*, num_classes):\n    pass\n",
        "build",
        ["build() needs arguments (num_classes)"],
    ),
    "argparse_at_import": (
        "script_models",
        "import argparse\nparser = argparse.ArgumentParser()\nparser.add_argument('--epochs')\n"
        "parser.parse_args()\n",
        "build",
        ["importing 'script_models' called sys.exit(2)", "if __name__ == '__main__'"],
    ),
    "factory_exits": (
        "exiting_models",
        "import sys\ndef build():\n    sys.exit('cannot build')\n",
        "build",
        ["build() called sys.exit('cannot build')"],
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
@pytest.mark.parametrize("command", ["explain", "demo"])
def test_a_broken_model_module_is_one_line(capsys, image_file, module_dir, case, command):
    name, source, attribute, fragments = BROKEN[case]
    write_module(module_dir, name, source)
    spec = f"{name}:{attribute}"
    target = [image_file] if command == "explain" else ["--photos", "chelsea"]
    code, out, err = run(capsys, command, *target, "--model", spec)
    assert code == cli.EXIT_RUNTIME
    assert_one_line_error(err, f"model {spec!r}", *fragments)
    assert out == ""


@pytest.mark.parametrize(
    "spec, fragment",
    [
        (":tiny", "expected package.module:factory"),
        ("cli_models:", "expected package.module:factory"),
        ("kfx_test_no_such_module:build", "No module named 'kfx_test_no_such_module'; check the name"),
        ("cli_models.nothing_here:build", "'cli_models' is not a package; check the name"),
        ("nosuchpackage.models:build", "nosuchpackage"),
        ("bogus", "unknown model"),
        ("cli_models:not_a_model", "not a torch.nn.Module"),
    ],
)
def test_a_model_spec_that_names_nothing_says_how_to_name_one(capsys, image_file, spec, fragment):
    code, _, err = run(capsys, "explain", image_file, "--model", spec)
    assert code == cli.EXIT_RUNTIME
    assert_one_line_error(err, fragment)


def test_what_a_model_module_prints_at_import_is_kept(capsys, image_file, module_dir):
    write_module(
        module_dir,
        "chatty_models",
        "import sys\nprint('chatty: loading weights', file=sys.stderr)\nfrom cli_models import tiny as build\n",
    )
    code, _, err = run(capsys, "explain", image_file, "--model", "chatty_models:build", *SIZE, "--patch", "8")
    assert code == cli.EXIT_OK, err
    assert "chatty: loading weights" in err


def test_a_broken_model_module_in_a_real_process(image_file, module_dir):
    """The installed entry point's path: exit status and stderr of a separate ``python -m kfx``."""
    write_module(module_dir, "raising_models", "raise RuntimeError('broken')\n")
    result = subprocess.run(
        [sys.executable, "-m", "kfx", "explain", str(image_file), "--model", "raising_models:build"],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": os.pathsep.join([KFX_ROOT, str(module_dir)]), "PATH": os.environ.get("PATH", "")},
    )
    assert result.returncode == cli.EXIT_RUNTIME
    assert_one_line_error(result.stderr, "RuntimeError: broken")


# -- Ctrl-C --------------------------------------------------------------------------------------------


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    "where",
    ["cli.build_parser", "cli._Parser.parse_args", "kfx.models.load_model", "cli.read_image", "kfx.compile",
     "cli.run_occlusion"],
)  # fmt: skip
def test_ctrl_c_anywhere_is_one_line_and_exit_130(capsys, monkeypatch, image_file, where):
    import kfx
    import kfx.models

    owner, attribute = where.rsplit(".", 1)
    owners = {"cli": cli, "cli._Parser": cli._Parser, "kfx.models": kfx.models, "kfx": kfx}
    monkeypatch.setattr(owners[owner], attribute, _interrupt)
    code, _, err = run(capsys, "explain", image_file, "--model", TINY, *SIZE, "--patch", "8")
    assert code == cli.EXIT_INTERRUPTED == 130
    assert_one_line_error(err, "interrupted")


def test_ctrl_c_in_a_model_factory_is_one_line_and_exit_130(capsys, image_file, module_dir):
    write_module(module_dir, "slow_models", "def build():\n    raise KeyboardInterrupt\n")
    code, _, err = run(capsys, "explain", image_file, "--model", "slow_models:build")
    assert code == cli.EXIT_INTERRUPTED
    assert_one_line_error(err, "interrupted")


def test_the_help_documents_every_exit_status(capsys):
    assert cli.main(["--help"]) == cli.EXIT_OK
    help_text = " ".join(capsys.readouterr().out.split())
    for status in ("0 success", "2 a bad command line", "1 a runtime failure", "130 interrupted"):
        assert status in help_text


# -- failures kfx does not anticipate ----------------------------------------------------------------------


def test_running_out_of_memory_says_what_to_change(capsys, monkeypatch, image_file):
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    monkeypatch.setattr(cli, "run_occlusion", out_of_memory)
    code, _, err = run(capsys, "explain", image_file, "--model", TINY, *SIZE, "--patch", "8")
    assert code == cli.EXIT_RUNTIME
    assert_one_line_error(err, "out of GPU memory", "Tried to allocate 2.00 GiB", "--batch-size")


def test_an_unexpected_exception_is_still_one_line(capsys, monkeypatch, image_file):
    def broken(*args, **kwargs):
        raise RuntimeError("something inside\nspanning lines")

    monkeypatch.setattr(cli, "run_occlusion", broken)
    code, _, err = run(capsys, "explain", image_file, "--model", TINY, *SIZE, "--patch", "8")
    assert code == cli.EXIT_RUNTIME
    assert_one_line_error(err, "unexpected RuntimeError: something inside", "report")


# -- models whose arithmetic fails: refused, never a map with holes ------------------------------------------

NAN_MODELS = """
import torch
from torch import nn
from cli_models import tiny


class LogMagnitude(nn.Module):
    def forward(self, x):
        return torch.log(x.abs())  # -inf where the patch's fill (0.0) covers a pixel


def nan_bias():
    model = tiny()
    model[-1].bias.data[3] = float("nan")
    return model


def nan_when_occluded():
    return nn.Sequential(LogMagnitude(), *tiny())
"""


@pytest.mark.parametrize(
    "factory, fragments",
    [
        ("nan_bias", ["scores on the unoccluded image hold NaN", "--weights"]),
        (
            "nan_when_occluded",
            ["photo: the model gave NaN probabilities at 49 of 49 patch positions", "--fill"],
        ),
    ],
)
def test_a_model_that_gives_nan_is_refused(capsys, image_file, module_dir, tmp_path, factory, fragments):
    write_module(module_dir, "nan_models", NAN_MODELS)
    options = ["--patch", "8", "--stride", "4", "--json", "m.json", "--npy", "m.npy"]
    code, _, err = run(capsys, "explain", image_file, "--model", f"nan_models:{factory}", *SIZE, *options)
    assert code == cli.EXIT_RUNTIME
    assert_one_line_error(err, *fragments)
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "m.npy").exists()


# -- stdout closed by its reader (kfx explain ... --json - | head -1) -----------------------------------------


class _ClosedPipe:
    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")


def test_a_closed_stdout_is_one_line(capsys, monkeypatch, image_file):
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    code = cli.main(["explain", str(image_file), "--model", TINY, *SIZE, "--patch", "8", "--json", "-"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_RUNTIME
    assert_one_line_error(err, "stdout was closed")


def test_a_closed_stdout_in_a_real_process(image_file):
    """No 'Exception ignored ... BrokenPipeError' from the interpreter's last flush either."""
    second = image_file.with_name("second.png")
    second.write_bytes(image_file.read_bytes())
    command = [sys.executable, "-m", "kfx", "explain", str(image_file), str(second), "--model", TINY, *SIZE]
    tests = str(Path(__file__).resolve().parent)
    process = subprocess.Popen(
        [*command, "--patch", "8", "--json", "-", "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([KFX_ROOT, tests])},
    )
    process.stdout.close()  # the reader is gone before kfx writes its first line
    err = process.stderr.read()
    assert process.wait(timeout=300) == cli.EXIT_RUNTIME
    assert_one_line_error(err, "stdout was closed")


@pytest.mark.parametrize("command", ["explain", "demo"])
def test_weights_for_the_default_model_are_a_usage_error(capsys, image_file, tmp_path, command):
    """A contradictory command line (exit 2), found before any model is loaded."""
    weights = tmp_path / "w.pt"
    torch.save({}, weights)
    target = [image_file] if command == "explain" else []
    code, _, err = run(capsys, command, *target, "--weights", weights)
    assert code == cli.EXIT_USAGE
    assert_one_line_error(err, "--weights applies to", "efficientnet-lite0")
