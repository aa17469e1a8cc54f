"""`python app/main.py`: help, one-line start-up errors, and the real entry point serving the page."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from app import main as app_main

ROOT = Path(__file__).resolve().parent.parent


def test_help_answers_before_torch_or_the_media_stack_loads() -> None:
    """``python app/main.py --help`` answers in about a second: torch, diffusers, aiortc and PyAV take ten or more."""
    probe = ("import runpy, sys\n"
             "sys.argv = ['app/main.py', '--help']\n"
             "try:\n    runpy.run_path('app/main.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print('loaded:', sorted(m for m in ('torch', 'diffusers', 'transformers', 'aiortc', 'av', 'gradio')"
             " if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--source-reconnect" in done.stdout and done.stdout.strip().endswith("loaded: []"), done.stdout[-300:]


#: every other command: its module (run as ``python -m``) and a flag its ``--help`` names
COMMANDS = [("app.stylize", "--crop"), ("app.bench", "--skip-ceiling"), ("engine.bench", "--skip-diffusers"),
            ("engine.parallel.asyncdiff", "--warmup-steps"), ("engine.parallel.bench_stream", "--calls"),
            ("engine.parallel.bench_replicas", "--offer-fps"), ("engine.parallel.bench", "--configs"),
            ("engine.parallel.bench_components", "--repeats")]


@pytest.mark.parametrize("module,flag", COMMANDS)
def test_every_command_answers_help_and_bad_flags_before_torch_loads(module, flag) -> None:
    """``python -m <module> --help`` (exit 0) and an unknown flag (exit 2) answer before torch, diffusers,
    transformers or PyAV load: the parser and its checks need none of them."""
    probe = ("import runpy, sys\n"
             "for flag in ('--help', '--no-such-flag'):\n"
             f"    sys.argv = [{module!r}, flag]\n"
             "    try:\n"
             f"        runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
             "    except SystemExit as exit:\n"
             "        print('exit', exit.code)\n"
             "print('loaded:', sorted(m for m in ('torch', 'diffusers', 'transformers', 'av') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert flag in done.stdout and "exit 0\nexit 2\n" in done.stdout, done.stdout[-300:] + done.stderr[-300:]
    assert done.stdout.strip().endswith("loaded: []"), done.stdout[-300:]


def test_help_documents_every_flag_with_its_default(capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        app_main.main(["--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--model", "--trt", "--prompt", "--host", "--port", "--width", "--height", "--strength",
                 "--t-index-list", "--cfg-type", "--max-sessions", "--auth", "--share", "--device", "--codec",
                 "--bitrate", "--hang-timeout"):
        assert flag in text, flag
    assert "(default: 127.0.0.1)" in text and "(default: 7860)" in text and "(default: stabilityai/sd" in text
    assert "(default: None)" not in text


@pytest.mark.parametrize("argv,message", [
    (["--model", "tiny", "--width", "100"], "width=100 must be a multiple of 8"),
    (["--model", "tiny", "--port", "0"], "--port 0 is out of range"),
    (["--model", "tiny", "--auth", "nopassword"], "--auth must be USER:PASS"),
    (["--model", "tiny", "--strength", "3"], "strength=3.0 is out of range"),
    (["--model", "tiny", "--trt"], "--trt needs"),
    (["--model", "tiny", "--devices", "98,99"], "--devices names cuda:98,cuda:99, but this torch build sees"),
    (["--model", "/no/such/model.safetensors"], "does not exist"),
    (["--model", "tiny", "--hang-timeout", "-1"], "hang_timeout=-1.0 must be a positive number of seconds"),
])
def test_bad_values_exit_2_with_one_line(argv, message, capsys) -> None:
    assert app_main.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("diffcam: ") and message in err, err


def test_offline_default_model_points_to_the_tiny_model(monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-diffcam-cache")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", "/nonexistent-diffcam-cache")
    assert app_main.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "'stabilityai/sd-turbo'" in err and "--model tiny" in err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(process: subprocess.Popen, port: int, seconds: float = 90) -> None:
    """Until the server started as ``process`` answers ``/healthz`` on ``port`` (it loads a model first)."""
    deadline = time.monotonic() + seconds
    while True:
        assert process.poll() is None, process.stdout.read()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.2)


def stop_with_ctrl_c(process: subprocess.Popen, timeout: float = 20) -> str:
    """Stop the server started as ``process`` as Ctrl+C does (killed if it takes over ``timeout`` s); its output."""
    process.send_signal(signal.SIGINT)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    return output


def test_the_entry_script_serves_the_page_and_stops_cleanly() -> None:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "app/main.py", "--model", "tiny", "--port", str(port)],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_server(process, port)
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=10)
        assert page.status_code == 200 and "gradio" in page.text.lower()
        config = httpx.get(f"http://127.0.0.1:{port}/config", timeout=10).json()
        assert "diffcam-start" in str(config) and "window.diffcam" in config.get("head", "")
    finally:
        output = stop_with_ctrl_c(process)
    assert process.returncode == 0, output
    assert "random weights" in output and f"open http://127.0.0.1:{port}" in output


def test_ctrl_c_while_the_model_loads_stops_without_a_traceback(monkeypatch, capsys) -> None:
    from engine.runtime import Engine

    def interrupted(self, progress=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(Engine, "load", interrupted)
    assert app_main.main(["--model", "tiny", "--no-ui"]) == 130
    assert capsys.readouterr().err.strip().endswith("stopped")
