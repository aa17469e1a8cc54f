"""The TensorRT builder and runtime, type-checked against ``tensorrt-stubs`` (TensorRT itself cannot be
installed here: its wheels come from NVIDIA's own index).

The published stubs are generated from the bindings' docstrings and five of their lines are not
valid Python (parameters named ``in``, a required parameter after defaulted ones, an import of
the binary ``tensorrt_libs``); they also lack a ``py.typed`` marker. The test checks against a
repaired copy in a temporary folder; the repairs touch no signature our code uses.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MYPY_CONFIG = """
[mypy]
follow_imports = silent
ignore_missing_imports = True
[mypy-torch.*,tqdm.*,engine.*,onnx.*,onnxruntime.*,polygraphy.*,onnx_graphsurgeon.*]
follow_imports = skip
[mypy-tensorrt.*,tensorrt_bindings.*]
ignore_errors = True
"""

pytest.importorskip("mypy", reason="needs mypy (test extra)")


def stub_folders() -> list[Path]:
    try:
        files = importlib.metadata.distribution("tensorrt-stubs").files or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("needs tensorrt-stubs (.ci/run installs it with --no-deps)")
    roots = {Path(str(f.locate())).parent for f in files if f.name == "__init__.pyi"}
    return sorted(roots)


@pytest.fixture(scope="module")
def checker(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stubs")
    for source in stub_folders():
        shutil.copytree(source, folder / source.name)
    for stub in folder.rglob("*.pyi"):
        text = re.sub(r"\bin: ", "in_: ", stub.read_text("utf-8"))
        text = text.replace("channel_axis: int) -> IScaleLayer", "channel_axis: int = ...) -> IScaleLayer")
        stub.write_text(text.replace("import tensorrt_libs as tensorrt_libs\n", ""), "utf-8")
    config = folder / "mypy.ini"
    config.write_text(MYPY_CONFIG)

    def check(*paths: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "mypy", "--config-file", str(config), "--cache-dir", str(folder / ".cache"),
             *map(str, paths)],
            capture_output=True, text=True, timeout=300, cwd=ROOT, env={"MYPYPATH": str(folder), "PATH": ""})

    return check


def test_trt_build_type_checks_against_the_tensorrt_stubs(checker) -> None:
    result = checker(ROOT / "trt_build")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found" in result.stdout


def test_the_check_catches_a_wrong_tensorrt_call(checker, tmp_path) -> None:
    wrong = tmp_path / "wrong.py"
    wrong.write_text("import tensorrt as trt\n"
                     "def build(network: trt.INetworkDefinition) -> None:\n"
                     "    network.get_input('sample')\n"
                     "    trt.BuilderFlag.FP17\n")
    result = checker(wrong)
    assert result.returncode == 1
    assert 'incompatible type "str"; expected "int"' in result.stdout
    assert '"type[BuilderFlag]" has no attribute "FP17"' in result.stdout
