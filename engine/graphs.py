"""The engine's own CUDA graphs: one captured call per number of streams, replayed over static buffers.

Eager, an sd-turbo UNet call at 512² spends most of its time launching kernels (27 ms eager,
9 ms replayed from a graph on an H200). So, as vLLM's and SGLang's graph runners do, the
device's worker captures the whole of one call (:func:`engine.step.stream_step`: fitted
pixels → encode → noise → UNet → guidance and scheduler math → buffer shift → decode →
uint8) once for each number of streams ``k`` it will batch, then replays it:

- inputs live in static buffers sized for the most streams (the slot index and the pixels);
  ``k`` streams use their first ``k`` rows;
- each stream's state lives in its slot (:mod:`engine.slots`), which the graph gathers by index
  and writes back, so a replay serves whichever streams the index names;
- every size shares one memory pool, captured largest first (a size that cannot be captured runs
  eagerly, and the sizes after it share a new pool); outputs are read (copied to pinned host
  memory, one synchronisation) before the next replay overwrites them.

:class:`CallRunner` is the same object with or without graphs: without, it runs the call
eagerly through the same static buffers. On the CPU, ``graphs=True`` stands a
:class:`EagerGraph` in for the CUDA graph (replay re-runs the call into the outputs of the
first run), so tests cover the buffer and state logic; only the real replay needs a GPU.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, fields
from typing import Callable, Protocol, TypeVar

import torch

from engine.backends import BackendOptions, prepare_backend
from engine.components import Components
from engine.config import StreamConfig
from engine.image import Frame, FrameKind, PixelLoader
from engine.slots import StreamSlots
from engine.step import StepModels, StepOutput, step_models, stream_step

log = logging.getLogger(__name__)

WARMUP_CALLS = 2  # before capture: compile, autotune, cuDNN and TensorRT set-up all happen on early calls

#: one CUDA graph capture at a time in the process: entering a capture empties the allocator's
#: cache on every device, which asserts while another device's worker is capturing
CAPTURE_LOCK = threading.RLock()  # re-entrant: a nested capture fails loudly instead of hanging

T = TypeVar("T")


def warm_up_on(side: torch.cuda.Stream, call: Callable[[], object]) -> None:
    """:data:`WARMUP_CALLS` calls of ``call`` on ``side``, the stream its capture will use, ordered after the
    current stream's work and before what follows it. A call that fails here fails eagerly too (a broken
    compile, say): the error propagates, it is not a capture failure."""
    caller = torch.cuda.current_stream(side.device)
    side.wait_stream(caller)
    with torch.cuda.stream(side):
        for _ in range(WARMUP_CALLS):
            call()
    caller.wait_stream(side)


def record_on(side: torch.cuda.Stream, call: Callable[[], T],
              pool: tuple[int, int] | None = None) -> tuple[torch.cuda.CUDAGraph, T]:
    """``call`` captured on ``side`` (into ``pool``; a fresh one if None); the graph and the call's outputs,
    which each replay rewrites. On failure (``RuntimeError``: an op that cannot be captured) the caller's stream
    is current again, the device idle and the device allocator no longer capturing, so the call can run eagerly
    from there; capture nothing more into ``pool`` (see :meth:`CallRunner._fresh_pool`)."""
    caller = torch.cuda.current_stream(side.device)
    graph = torch.cuda.CUDAGraph()
    pool = torch.cuda.graph_pool_handle() if pool is None else pool  # known: a failure ends recording to it
    try:
        with CAPTURE_LOCK:  # thread_local: other devices' workers go on running while this one captures
            with torch.cuda.graph(graph, pool=pool, stream=side, capture_error_mode="thread_local"):
                outputs = call()
    except RuntimeError:
        torch.cuda.set_stream(caller)  # a failed capture_end leaves the capture stream current (torch's exit)
        torch.cuda.synchronize(side.device)
        _end_allocating_to(side.device, pool)
        raise
    return graph, outputs


def _end_allocating_to(device: torch.device, pool: tuple[int, int]) -> None:
    """Stop the caching allocator routing allocations to ``pool``, which a failed capture leaves it doing.

    torch's ``capture_end`` throws (the stream's capture was invalidated) before it ends the pool's
    recording. Left so, the allocator counts a capture as under way for good: ``empty_cache`` and the
    out-of-memory retry stop freeing cached blocks, and the next capture into the same pool fails.
    """
    try:
        torch._C._cuda_endAllocateToPool(device.index, pool)
    except RuntimeError:  # nothing to end: the capture never began, or its capture_end did end it
        pass


@dataclass(frozen=True)
class CallResult:
    """One call's outputs, valid until the runner's next call: ``k·f`` frames stream-major."""

    pixels: torch.Tensor  # (k·f, H, W, 3) uint8, on the host
    unit: torch.Tensor    # (k·f, 3, H, W) float32 in [0, 1], on the device
    latents_finite: list[bool]
    pixels_finite: list[bool]

    def frames(self, position: int, count: int, kind: FrameKind) -> list[Frame]:
        """Stream ``position``'s ``count`` frames as ``kind``, copied out of the shared buffers."""
        rows = slice(position * count, (position + 1) * count)
        if kind == "pt":  # a contiguous copy: the buffer is the graph's, and channels_last on CUDA
            return list(self.unit[rows].clone(memory_format=torch.contiguous_format).unbind(0))
        return list(self.pixels[rows].numpy().copy())


def prepared_runner(models: StepModels, slots: StreamSlots, streams: int, *, graphs: bool, compiled: bool,
                    progress: Callable[[str], None] = lambda line: None) -> CallRunner:
    """A runner with every call size ready: captured as graphs, or (compiled kernels) run once; before any stream."""
    runner = CallRunner(models, slots, streams)
    if graphs:
        runner.capture(progress=progress)
    elif compiled:
        runner.warm_up(progress=progress)
    return runner


def stream_runner(components: Components, config: StreamConfig, backend: str, *, graphs: bool,
                  release: bool = True) -> CallRunner:
    """A runner for one stream on ``backend`` (already resolved), its call captured or compiled before use."""
    prepared, unet = prepare_backend(backend, components, config, BackendOptions(release=release, call_graphs=graphs))
    return prepared_runner(step_models(prepared, unet), StreamSlots.for_config(prepared, config), 1,
                           graphs=graphs, compiled=backend == "compile")


class Graph(Protocol):
    def replay(self) -> None: ...


class EagerGraph:
    """A CUDA graph's contract without CUDA: replay re-runs the call and writes into the first run's outputs."""

    def __init__(self, call: Callable[[], StepOutput]) -> None:
        self.call = call
        self.outputs = call()

    def replay(self) -> None:
        fresh = self.call()
        for field in fields(StepOutput):
            getattr(self.outputs, field.name).copy_(getattr(fresh, field.name))


@dataclass(frozen=True)
class Captured:
    graph: Graph
    outputs: StepOutput


class CallRunner:
    """Runs calls of 1 … ``max_streams`` streams over static buffers; replays captured sizes as graphs."""

    def __init__(self, models: StepModels, slots: StreamSlots, max_streams: int, *, encode: bool = True) -> None:
        if max_streams > slots.capacity:
            raise ValueError(f"max_streams={max_streams} exceeds the {slots.capacity} stream slots")
        self.models, self.slots, self.max_streams, self.encode = models, slots, max_streams, encode
        self.device = slots.device
        shape, cuda = slots.shape, slots.device.type == "cuda"
        rows = max_streams * shape.frames
        self.index = torch.zeros(max_streams, dtype=torch.long, device=self.device)
        self.pixels = torch.zeros(rows, 3, shape.height, shape.width, device=self.device)
        self.loader = PixelLoader(self.pixels)
        self._host_index = torch.zeros(max_streams, dtype=torch.long, pin_memory=cuda)
        self._host_pixels = torch.empty(rows, shape.height, shape.width, 3, dtype=torch.uint8, pin_memory=cuda)
        self._host_flags = torch.empty(max_streams, 2, dtype=torch.bool, pin_memory=cuda)  # k rows: contiguous
        self._graphs: dict[int, Captured] = {}
        self._pool = self._fresh_pool()
        #: one capture stream for every size: the allocator reuses a pool's blocks only on the stream that
        #: allocated them, so sizes captured on one stream share their intermediates (torch's graph docs)
        self._side = torch.cuda.Stream(self.device) if cuda else None
        self._logged_eager: set[int] = set()

    @property
    def captured(self) -> list[int]:
        """The stream counts that replay as graphs."""
        return sorted(self._graphs)

    @torch.inference_mode()  # as every call runs: compiled code guards on it
    def capture(self, sizes: list[int] | None = None, progress: Callable[[str], None] = lambda line: None) -> None:
        """Capture a graph for each stream count in ``sizes`` (default all), largest first, sharing one pool
        (a new one after a size that could not be captured: that size runs eagerly).

        Run it on the thread that will replay (the device's worker) before any stream takes a slot:
        the warm-up calls write into the first slots.
        """
        if self.slots.in_use:
            raise RuntimeError("capture graphs before streams take slots: warm-up calls write into them")
        for k in sorted(sizes or range(1, self.max_streams + 1), reverse=True):
            progress(f"capturing the call for {k} stream(s) as a {'CUDA' if self._pool else 'stand-in'} graph")
            self.index[:k].copy_(torch.arange(k))
            self._warm(k)
            try:
                self._graphs[k] = self._record(k)
            except RuntimeError as error:  # an op that cannot be captured: this size runs eagerly, still correct
                log.warning("could not capture the call for %d stream(s) (%s); it runs eagerly", k, error)
                self._pool = self._fresh_pool()

    @torch.inference_mode()
    def warm_up(self, sizes: list[int] | None = None, progress: Callable[[str], None] = lambda line: None) -> None:
        """Run each call size once now (compiling kernels for it), so no stream waits for that later.

        Like :meth:`capture`, before any stream takes a slot.
        """
        if self.slots.in_use:
            raise RuntimeError("warm up before streams take slots: warm-up calls write into them")
        for k in sorted(sizes or range(1, self.max_streams + 1), reverse=True):
            progress(f"compiling the call for {k} stream(s) (once per size)")
            self.index[:k].copy_(torch.arange(k))
            self._step(k)

    @torch.inference_mode()
    def run(self, slots: list[int], frames: list[Frame | torch.Tensor] | None) -> CallResult:
        """One call for the streams in ``slots`` (``frames``: theirs, ``f`` each, stream-major; None for txt2img)."""
        k = len(slots)
        if not 0 < k <= self.max_streams:
            raise ValueError(f"a call takes 1 to {self.max_streams} streams, got {k}")
        self._host_index[:k] = torch.tensor(slots)
        self.index[:k].copy_(self._host_index[:k], non_blocking=True)
        if frames is not None:
            self.loader.load(frames)
        captured = self._graphs.get(k)
        if captured is not None:
            captured.graph.replay()
            output = captured.outputs
        else:
            self._log_eager(k)
            output = self._step(k)
        return self._to_host(k, output)

    def _step(self, k: int) -> StepOutput:
        pixels = self.pixels[: k * self.slots.shape.frames] if self.encode else None
        return stream_step(self.models, self.slots, self.index[:k], pixels)

    def _fresh_pool(self) -> tuple[int, int] | None:
        """A new memory pool for the sizes still to capture (none for stand-ins). After a failed capture the
        old pool cannot take more: torch's host allocator keeps recording to it, and there is no call to end
        that, so its next capture would fail as "already recording"."""
        return torch.cuda.graph_pool_handle() if self.device.type == "cuda" else None

    def _warm(self, k: int) -> None:
        """The calls before a capture (compile, autotune, cuDNN and TensorRT set-up); none for a stand-in."""
        if self._side is not None:
            warm_up_on(self._side, lambda: self._step(k))

    def _record(self, k: int) -> Captured:
        if self._side is None:
            stand_in = EagerGraph(lambda: self._step(k))
            return Captured(stand_in, stand_in.outputs)
        graph, outputs = record_on(self._side, lambda: self._step(k), self._pool)
        return Captured(graph, outputs)

    def _to_host(self, k: int, output: StepOutput) -> CallResult:
        """Pixels and flags to the host in two copies and one synchronisation."""
        rows = k * self.slots.shape.frames
        pixels, flags = self._host_pixels[:rows], self._host_flags[:k]
        pixels.copy_(output.pixels, non_blocking=True)
        flags.copy_(torch.stack([output.latents_finite, output.pixels_finite], dim=1), non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        latents_finite, pixels_finite = flags.T.tolist()
        return CallResult(pixels, output.unit[:rows], latents_finite, pixels_finite)

    def _log_eager(self, k: int) -> None:
        if self._graphs and k not in self._logged_eager:
            self._logged_eager.add(k)
            log.info("no graph captured for %d streams per call: running that size eagerly", k)
