"""A clip through the stream: each picture stylized and written at its own time, by :func:`stylize`.

The stream is one device's :class:`~engine.stream.StreamDiffusion`, or with several devices a
:class:`~engine.parallel.sharded.ShardedStream`, its UNet cut over one process per device, driven
two calls deep (:class:`TwoInFlight`); the frames still come out in order, each at its own time.
:mod:`app.stylize` is the command line around it.
"""

from __future__ import annotations

import argparse
from collections import deque
from dataclasses import replace
from fractions import Fraction
from typing import Iterable, cast

import av
import numpy as np
import torch
from tqdm import tqdm

from app.media import ClipWriter, Item, Picture
from engine.backends import backend_missing, resolve_backend
from engine.cli import model_spec
from engine.components import Components
from engine.config import StreamConfig
from engine.graphs import stream_runner
from engine.models import load_components, local_model
from engine.parallel.sharded import MAX_IN_FLIGHT, ShardedStream
from engine.stream import StreamDiffusion


class TwoInFlight:
    """A :class:`~engine.parallel.sharded.ShardedStream` behind one device's call, kept two calls deep.

    Each call submits its picture before taking the oldest call's, so the first device encodes the
    next picture while the last one decodes the one before (:mod:`engine.parallel.sharded`). A
    picture comes back ``n`` calls after it went in, one more than on one device; :func:`stylize`
    keeps the times of those in flight whatever the delay. ``calls`` counts the calls submitted.
    """

    def __init__(self, sharded: ShardedStream) -> None:
        self.sharded = sharded
        self.calls = 0

    @property
    def config(self) -> StreamConfig:
        return self.sharded.config

    def __call__(self, image: np.ndarray) -> np.ndarray | None:
        """Submit ``image``; the oldest call's picture once two are in flight, else (or while warming up) None."""
        self.sharded.submit([image])
        self.calls += 1
        if self.calls < MAX_IN_FLIGHT:
            return None
        result = self.sharded.result()
        return None if result is None else cast(np.ndarray, result[0])

    def update(self, **changes: object) -> None:
        self.sharded.update(**changes)

    def close(self) -> None:
        """Stop the device processes (a call still in flight is dropped). Idempotent."""
        self.sharded.close()


def stylize(stream: StreamDiffusion | TwoInFlight, items: Iterable[Item], writer: ClipWriter,
            progress: tqdm | None = None) -> int:
    """Write each input picture's stylized picture at its time, in order; audio goes straight through.

    A picture comes back ``n - 1`` calls after it went in (``n`` through :class:`TwoInFlight`), so
    the times of those in flight wait in ``pending``; at the end the last picture is fed again
    until they are all out. A picture the similarity filter skips shows what the picture before it
    shows. Returns frames written.
    """
    pending: deque[list[Fraction]] = deque()
    last: np.ndarray | None = None
    for item in items:
        if isinstance(item, av.Packet):
            writer.write_audio(item)
            continue
        last = item.image
        _feed(stream, item, pending, writer)
        if progress is not None:
            progress.update()
    if stream.config.similarity_filter:
        stream.update(similarity_filter=False)  # the filter would skip the repeated last picture
    while pending and last is not None:
        _emit(_call(stream, last), pending, writer)
    return writer.frames


def _feed(stream: StreamDiffusion | TwoInFlight, item: Picture, pending: deque[list[Fraction]],
          writer: ClipWriter) -> None:
    calls = stream.calls
    output = _call(stream, item.image)
    if stream.calls > calls:
        pending.append([item.time])
        _emit(output, pending, writer)
    elif pending:  # skipped, its predecessor still in flight
        pending[-1].append(item.time)
    elif output is not None:  # skipped: the stream re-shows its predecessor's picture
        writer.write_picture(output, item.time)


def _call(stream: StreamDiffusion | TwoInFlight, image: np.ndarray) -> np.ndarray | None:
    """One call of the stream: an array in, an array (or None while warming up) out."""
    return cast("np.ndarray | None", stream(image))


def _emit(output: np.ndarray | None, pending: deque[list[Fraction]], writer: ClipWriter) -> None:
    if output is None:  # still warming up
        return
    for at in pending.popleft():
        writer.write_picture(output, at)


def fast_stream(components: Components, config: StreamConfig, backend: str) -> StreamDiffusion:
    """The stream on ``backend``, its call captured as a CUDA graph on a GPU (this one thread owns the device)."""
    runner = stream_runner(components, config, resolve_backend(backend, components.device),
                           graphs=components.device.type == "cuda")
    return StreamDiffusion(components, config, runner=runner)


def open_stream(args: argparse.Namespace, config: StreamConfig,
                devices: tuple[str, ...]) -> StreamDiffusion | TwoInFlight:
    """The stream the flags describe, loaded: sharded over ``devices`` (two or more), or on one device."""
    if len(devices) > 1:  # a hub model is fetched once here, not by each device process
        spec = local_model(model_spec(args), devices[0])
        return TwoInFlight(ShardedStream(spec.model, config, devices=devices, vae=spec.vae, lcm_lora=spec.lcm_lora,
                                         dtype=rank_dtype(args, devices), resync_every=args.resync_every))
    spec = model_spec(args) if not devices else replace(model_spec(args), device=devices[0])
    missing = backend_missing(args.backend, spec.resolved_device())
    if missing is not None:
        raise ValueError(f"--backend {args.backend} needs {missing}")
    return fast_stream(load_components(spec), config, args.backend)


def rank_dtype(args: argparse.Namespace, devices: tuple[str, ...]) -> str:
    """``--dtype`` as the sharded ranks take it; by default what one of ``devices`` would use (fp16 on CUDA)."""
    return str(model_spec(args).resolved_dtype(torch.device(devices[0]))).removeprefix("torch.")


def where(stream: StreamDiffusion | TwoInFlight, args: argparse.Namespace) -> str:
    """Which model runs where, and how."""
    if isinstance(stream, TwoInFlight):
        sharded = stream.sharded
        resync = f" and every {sharded.resync_every} calls" if sharded.resync_every else ""
        return (f"model {args.model} sharded over {','.join(sharded.devices)} ({rank_dtype(args, sharded.devices)}), "
                f"--parallel asyncdiff: {sharded.components} UNet components, {sharded.warmup_calls} synchronous "
                f"calls at the start{resync}, two calls in flight; backend torch")
    components = stream.components
    return (f"model {components.name} on {components.device} ({components.dtype}), "
            f"backend {resolve_backend(args.backend, components.device)}")
