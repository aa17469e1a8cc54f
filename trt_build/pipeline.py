"""From loaded components to TensorRT engines: export, clean, build, cache, load.

    missing = tensorrt_missing()          # None, or what to install
    plan = BuildPlan(components, ShapeProfile.for_stream(config, sessions=4), model="stabilityai/sd-turbo")
    components, unet = accelerate(plan)   # VAE halves and UNet now run as engines

An engine found in the cache is loaded without exporting anything; a missing one is
exported to ONNX, cleaned, built and cached. The ONNX files go to a folder of that engine's own
under the cache's ``onnx/`` folder (GBs for a UNet, too much for a small ``/tmp``), used only
under the engine's build lock, so processes building at once never read or delete each other's;
it is removed once the engine is built, and emptied first (what a killed build left). Processes wanting the same engine build it once (see :class:`EngineCache`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from engine.backends import BackendOptions
from engine.components import Components
from engine.config import StreamConfig
from trt_build.adapters import EngineUNet, EngineVae
from trt_build.cache import EngineCache, EngineKey, weights_fingerprint
from trt_build.export import OPSET, PARTS, ExportSpec, export_onnx, export_specs
from trt_build.optimize import CleanReport, clean_onnx
from trt_build.shapes import ShapeProfile

Progress = Callable[[str], None]


ONNX_TOOLS = ("onnx", "onnx_graphsurgeon", "polygraphy", "onnxruntime")


def onnx_tools_missing() -> str | None:
    """None when the export and clean-up tools are installed; otherwise which and how to get them."""
    absent = [name for name in ONNX_TOOLS if importlib.util.find_spec(name) is None]
    return f"the ONNX tools {absent} (pip install -e '.[onnx]')" if absent else None


def tensorrt_missing() -> str | None:
    """None when TensorRT 10+, the ONNX tools and a CUDA GPU are usable; otherwise what is missing and how to get it."""
    missing = [m for m in [onnx_tools_missing()] if m]
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU visible to torch (install the CUDA build of torch on an NVIDIA machine)")
    version = tensorrt_version()
    if version is None:
        missing.append("TensorRT (pip install -e '.[trt]' on a machine that reaches NVIDIA's TensorRT wheels)")
    elif not (10, 1) <= _major_minor(version) < (11, 0):
        missing.append(f"TensorRT 10.1 or a later 10.x (found {version}: 10.0 lacks device_memory_size_v2, 11 "
                       f"removed the FP16 builder flag; pip install 'tensorrt>=10.1,<11')")
    return " and ".join(missing) or None


def _major_minor(version: str) -> tuple[int, int]:
    """``"10.1.0.27"`` → ``(10, 1)``."""
    numbers = [int(n) for n in re.findall(r"\d+", version)[:2]] + [0]
    return numbers[0], numbers[1]


def tensorrt_version() -> str | None:
    """The installed TensorRT's version; None when absent (``tensorrt-stubs`` alone is an empty package)."""
    try:
        module = importlib.import_module("tensorrt")
    except ImportError:
        return None
    return getattr(module, "__version__", None)


@dataclass(frozen=True)
class BuildPlan:
    """What to build: for which components and shapes, at what precision, cached where."""

    components: Components
    profile: ShapeProfile
    model: str
    lora: str | None = None
    fp16: bool = True
    cache: EngineCache = dataclasses.field(default_factory=EngineCache)
    _fingerprints: dict[int, str] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @property
    def precision(self) -> str:
        if self.components.dtype != torch.float32:
            return {torch.float16: "fp16", torch.bfloat16: "bf16"}[self.components.dtype]
        return "fp16" if self.fp16 else "fp32"

    def specs(self) -> dict[str, ExportSpec]:
        return export_specs(self.components, self.profile)

    @property
    def strongly_typed(self) -> bool:
        """An fp16 graph keeps its own types (see :mod:`trt_build.builder`)."""
        return self.components.dtype != torch.float32

    def key(self, spec: ExportSpec, tensorrt: str, gpu: tuple[str, str]) -> EngineKey:
        compute_capability, name = gpu
        return EngineKey(part=spec.part, model=self.model, weights=self.fingerprint(spec), lora=self.lora,
                         profile=self.profile, precision=self.precision, tensorrt=tensorrt,
                         compute_capability=compute_capability, gpu=name, opset=OPSET)

    @contextmanager
    def onnx_folder(self, key: EngineKey) -> Iterator[Path]:
        """The folder for the ONNX files of ``key``'s engine, emptied first and removed after.

        One per engine, and only ever used under that engine's build lock (:meth:`EngineCache.get_or_build`):
        no other build touches it meanwhile, and what a killed build left (GBs for a UNet) goes with the next.
        """
        folder = self.cache.root / "onnx" / Path(key.filename).stem
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def fingerprint(self, spec: ExportSpec) -> str:
        """The exported module's weights fingerprint, read once per model (the VAE serves two parts)."""
        model = next(spec.module.children())
        if id(model) not in self._fingerprints:
            self._fingerprints[id(model)] = weights_fingerprint(spec.module)
        return self._fingerprints[id(model)]


def prepare_onnx(spec: ExportSpec, target: Path, device: torch.device) -> CleanReport:
    """Export ``spec`` and clean the graph into ``target``.

    The raw export goes to a temporary folder that is removed afterwards: past 2 GB torch's
    exporter writes every weight as a file of its own beside the model (hundreds for an SD UNet).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{spec.part}-export-") as folder:
        raw = export_onnx(spec, Path(folder) / f"{spec.part}.onnx", device)
        return clean_onnx(raw, target)


def build_engines(plan: BuildPlan, progress: Progress = lambda stage: None) -> dict[str, Path]:
    """Every part's engine, from the cache or built now (needs TensorRT and a CUDA GPU)."""
    device = plan.components.device
    tensorrt = tensorrt_version() or "none"
    gpu = ("{}.{}".format(*torch.cuda.get_device_capability(device)), torch.cuda.get_device_name(device))
    engines = {}
    for part, spec in plan.specs().items():
        key = plan.key(spec, tensorrt, gpu)
        build = functools.partial(_write_engine, plan, spec, key, progress=progress)
        engines[part], _ = plan.cache.get_or_build(key, build, progress)
    return engines


def _write_engine(plan: BuildPlan, spec: ExportSpec, key: EngineKey, target: Path, progress: Progress) -> None:
    """Export, clean and build one part into ``target``; the ONNX files (GBs for a UNet) go once it is built."""
    from trt_build.builder import write_engine

    with plan.onnx_folder(key) as folder:
        progress(f"exporting {spec.part} to ONNX")
        onnx = prepare_onnx(spec, folder / f"{spec.part}.onnx", plan.components.device).path
        progress(f"building the {spec.part} engine (minutes, once)")
        write_engine(onnx, spec.shapes, target, fp16=plan.fp16, strongly_typed=plan.strongly_typed,
                     description=spec.part)


def accelerate(plan: BuildPlan, progress: Progress = lambda stage: None, *,
               release_torch: bool = False, own_graphs: bool = True) -> tuple[Components, EngineUNet]:
    """``plan.components`` with its VAE replaced by engines, and the UNet engine as a ``UNetFn``.

    ``own_graphs``: each engine replays its own CUDA graph per shape; off when the caller captures
    whole calls (a graph cannot be launched while another is being captured).
    ``release_torch`` moves the torch UNet to the CPU afterwards (its config is still read; its
    GPU memory, 1.7 GB for SD in fp16, is better spent on engines and sessions).
    """
    from trt_build.runtime import TrtEngine

    missing = tensorrt_missing()
    if missing is not None:
        raise RuntimeError(f"the TensorRT backend needs {missing}")
    engines = build_engines(plan, progress)
    progress("loading the engines")
    device = plan.components.device
    loaded = {part: TrtEngine(engines[part], device, cuda_graphs=own_graphs) for part in PARTS}
    vae = EngineVae(loaded["vae_encoder"], loaded["vae_decoder"], plan.components.dtype)
    if release_torch:
        plan.components.unet.to("cpu")
        torch.cuda.empty_cache()
    return dataclasses.replace(plan.components, vae=vae), EngineUNet(loaded["unet"])


def trt_missing(device: torch.device) -> str | None:
    """The ``trt`` backend's registry check (see :mod:`engine.backends`)."""
    if device.type != "cuda" and torch.cuda.is_available():
        return f"the model on the GPU (it is on {device}; pass --device cuda)"
    return tensorrt_missing()


def prepare_trt(components: Components, config: StreamConfig,
                options: BackendOptions) -> tuple[Components, EngineUNet]:
    """The ``trt`` backend: engines for ``config``'s shapes with ``options.sessions`` streams per call."""
    plan = BuildPlan(components, ShapeProfile.for_stream(config, options.sessions), model=options.model or components.name,
                     lora=options.lora)
    return accelerate(plan, options.progress, release_torch=options.release, own_graphs=not options.call_graphs)
