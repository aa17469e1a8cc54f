"""``--no-ui``: the app serves /offer, WHIP/WHEP, /healthz and /metrics without ever importing Gradio.

The GPU machine that runs ``.ci/gpu-check`` cannot carry Gradio's wheel, so these tests block
the import outright (an import hook that raises) rather than trusting that nobody asks for it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from app import main as app_main
from app.client import Client, SyntheticCamera
from app.serve import build_app
from engine.config import StreamConfig
from engine.synthetic import moving_frame
from tests.test_main import free_port, stop_with_ctrl_c, wait_for_server

ROOT = Path(__file__).resolve().parent.parent
SIZE = 64
CONFIG = StreamConfig(t_index_list=(32, 45), width=SIZE, height=SIZE, cfg_type="none", prompt="a watercolor painting")

#: run first in a fresh interpreter: any attempt to import gradio raises, so it cannot slip in unnoticed
BLOCK_GRADIO = """
import importlib.abc, sys

class NoGradio(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "gradio":
            raise ImportError(f"gradio is blocked in this test: something imported {name}")
        return None

sys.meta_path.insert(0, NoGradio())
"""

HEADLESS_IMPORTS = BLOCK_GRADIO + """
from app.serve import build_app
from engine.config import StreamConfig
from engine.presets import build_preset

config = StreamConfig(t_index_list=(32, 45), width=64, height=64, cfg_type="none")
tiny = build_preset("tiny")
build_app(tiny, config, ui=False)
import app.bench, app.client, app.main  # the app benchmark's whole path, its client subprocess included
loaded = sorted(m for m in sys.modules if m.split(".")[0] == "gradio" or m == "app.ui")
assert not loaded, f"imported without the page: {loaded}"
try:  # the control: with the page, the same hook must stop the import, or this test proves nothing
    build_app(tiny, config, ui=True)
except ImportError as error:
    print("the page needs gradio:", error)
else:
    raise SystemExit("build_app(ui=True) got past the gradio block: the check above is blind")
print("headless imports ok")
"""


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_build_app_without_the_page_never_imports_gradio() -> None:
    done = run_python(HEADLESS_IMPORTS)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "headless imports ok" in done.stdout and "the page needs gradio" in done.stdout, done.stdout


@pytest.fixture
async def headless(tiny):
    """The app without the page on 127.0.0.1, a free port; its base URL."""
    app, _ = build_app(tiny, CONFIG, max_sessions=1, idle_timeout=10, random_weights=True, ui=False)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 60
    while not server.started:
        if task.done():
            task.result()
        assert time.monotonic() < deadline, "the server did not come up"
        await asyncio.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


@pytest.mark.timeout(120)
async def test_without_the_page_the_api_serves_and_the_root_lists_it(headless) -> None:
    async with httpx.AsyncClient(base_url=headless, timeout=20) as http:
        health = await http.get("/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        root = await http.get("/")
        assert root.status_code == 200, root.text
        note = root.json()
        assert "--no-ui" in note["diffcam"]
        assert {"POST /offer", "POST /whip", "GET /healthz", "GET /metrics"} <= set(note["endpoints"])
        assert (await http.get("/metrics")).status_code == 200
    client = Client(SyntheticCamera([moving_frame(i, 240, 320) for i in range(30)]))
    try:  # signalling works without the page: stylized frames come back
        assert (await client.connect(headless)).status_code == 200
        frames = await client.wait_frames(3, timeout=60)
        assert frames[-1].shape[:2] == (SIZE, SIZE)
    finally:
        await client.close()


def test_help_documents_no_ui(capsys) -> None:
    with pytest.raises(SystemExit):
        app_main.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--no-ui serve without the Gradio page" in text, text


def test_share_needs_the_page(capsys) -> None:
    assert app_main.main(["--model", "tiny", "--share", "--no-ui"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("diffcam: "), err
    assert "--share" in err[0] and "--no-ui" in err[0], err


@pytest.mark.timeout(180)
def test_the_entry_script_serves_headless_with_gradio_blocked() -> None:
    port = free_port()
    argv = ["app/main.py", "--model", "tiny", "--no-ui", "--port", str(port)]
    code = BLOCK_GRADIO + f"import runpy; sys.argv = {argv!r}; runpy.run_path('app/main.py', run_name='__main__')"
    process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_server(process, port)
        root = httpx.get(f"http://127.0.0.1:{port}/", timeout=10)
        assert root.status_code == 200 and "POST /offer" in root.json()["endpoints"], root.text
    finally:
        output = stop_with_ctrl_c(process)
    assert process.returncode == 0, output
    assert f"serving http://127.0.0.1:{port} without a page" in output, output
    assert f"http://127.0.0.1:{port}/offer" in output and f"http://127.0.0.1:{port}/whip" in output, output
