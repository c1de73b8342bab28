"""``kfx serve`` on the command line: options, refusals and exit codes as ``kfx explain`` has them
(one line ``kfx: error: ...``; 0 ok, 1 runtime, 2 usage), without starting a real server."""

from __future__ import annotations

import socket
import sys

import pytest

from tests.test_serve import free_port

# -- kfx serve on the command line (kfx.cli.main: one line "kfx: error: ...", exit 0 / 1 / 2) -----


def run_kfx(capsys, *argv) -> tuple[int, str]:
    """kfx.cli.main(argv): its exit status and its stderr, checked to be one error line (no traceback)."""
    from kfx.cli import main

    status = main(list(argv))
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("kfx: error: ") and err.count("\n") == 1, err
    return status, err


TINY = ("--model", "tests.serve_models:tiny")


@pytest.fixture
def no_server(monkeypatch):
    """A command line that must be refused fails the test, rather than serving (and blocking) forever."""
    import kfx.serve

    def launch(*args, **kwargs):
        raise AssertionError("kfx serve started a server")

    monkeypatch.setattr(kfx.serve, "launch", launch)


def test_serve_options_have_their_defaults():
    import argparse

    from kfx.serve import add_arguments

    args = add_arguments(argparse.ArgumentParser()).parse_args([])
    assert (args.host, args.port, args.model, args.weights, args.batch_size) == (
        "127.0.0.1",
        7860,
        None,
        None,
        64,
    )


@pytest.mark.parametrize("port", ["99999", "0", "-1", "65536", "http"])
def test_serve_refuses_a_port_that_does_not_exist(no_server, capsys, port):
    status, err = run_kfx(capsys, "serve", *TINY, "--port", port)
    assert status == 2 and "argument --port:" in err and "1 to 65535" in err


@pytest.mark.parametrize("batch", ["0", "257", "many"])
def test_serve_refuses_a_batch_size_the_page_cannot_show(no_server, capsys, batch):
    status, err = run_kfx(capsys, "serve", *TINY, "--batch-size", batch)
    assert status == 2 and "argument --batch-size:" in err


def test_serve_refuses_a_port_in_use_before_loading_the_model(no_server, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # the model does not exist: the port is checked first, before any loading
        status, err = run_kfx(capsys, "serve", "--model", "tests.serve_models:missing", "--port", str(port))
    assert status == 1 and f"port {port} on 127.0.0.1 is in use" in err


def test_serve_refuses_a_host_that_is_not_this_machine(no_server, capsys):
    # 192.0.2.1 is TEST-NET-1 (RFC 5737), on no machine: binding to it fails here, nothing is sent
    status, err = run_kfx(capsys, "serve", *TINY, "--host", "192.0.2.1", "--port", str(free_port()))
    assert status == 2 and "--host 192.0.2.1: not an address of this machine" in err


def test_serve_reports_a_model_that_cannot_load_as_a_runtime_error(no_server, capsys):
    status, err = run_kfx(
        capsys, "serve", "--model", "tests.serve_models:missing", "--port", str(free_port())
    )
    assert status == 1 and "has no attribute 'missing'" in err


def test_serve_without_gradio_or_with_a_broken_install_is_a_usage_error(no_server, capsys, monkeypatch):
    import kfx.serve

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio raises ImportError
    status, err = run_kfx(capsys, "serve", *TINY, "--port", str(free_port()))
    assert status == 2 and "the explorer needs Gradio: pip install 'kfx[ui]'" in err
    monkeypatch.setitem(sys.modules, "kfx.serve", None)
    monkeypatch.delattr(kfx, "serve")
    status, err = run_kfx(capsys, "serve")
    assert status == 2 and "kfx serve is unavailable in this installation (ModuleNotFoundError: " in err
    monkeypatch.undo()
    assert kfx.serve.main(["--port", "0"]) == 2  # python -m kfx.serve: the same parser and messages
    assert capsys.readouterr().err.startswith("kfx: error: argument --port:")


def test_serve_starts_with_the_options_given_and_exits_0(capsys, monkeypatch):
    import kfx.serve
    from kfx.cli import main

    started = {}
    monkeypatch.setattr(
        kfx.serve, "launch", lambda loaded, **options: started.update(options, model=loaded.name)
    )
    port = free_port()
    assert main(["serve", *TINY, "--port", str(port), "--batch-size", "16"]) == 0
    assert started["model"] == "tests.serve_models:tiny"
    assert (started["host"], started["port"], started["batch_size"]) == ("127.0.0.1", port, 16)
    assert f"http://127.0.0.1:{port}" in capsys.readouterr().err
