"""One rank of a sharded live stream: its UNet component, and rank 0's and rank k−1's extra duties.

Rank i holds component i's blocks and nothing else of the UNet (the others are replaced by
parameter-free stand-ins before anything moves to the device). Rank 0 also holds the VAE
encoder, the text encoder, the time embedding and the stream's state (its slot: latent buffer,
noise, stock noise, coefficients, prompt embeddings, exactly as :class:`StreamDiffusion` keeps
them); rank k−1 holds the VAE decoder and ``conv_norm_out``.

One call (:mod:`engine.parallel.sharded` explains the schedule):

- rank 0: encode the new frame, noise it, stack it on the buffer, run component 0 on the stream
  batch and send its outputs on; wait for rank k−1's noise prediction; apply RCFG and the LCM
  step (:mod:`engine.step`'s own functions), move the buffer on, and send the finished latents to
  rank k−1;
- rank i ≥ 1: run component i on its predecessors' outputs: this call's (synchronous) or the
  previous call's (asynchronous, already received while the previous call ran);
- rank k−1: send its output (the noise prediction) to rank 0, receive the finished latents,
  decode them, and hand the frame to the driver through shared memory.

Rank 0 sends every rank each call's command (point to point, so rank 0 can start a call while rank
k−1 still decodes the one before; over gloo on the CPU, so an idle rank sleeps: see
:mod:`engine.parallel.links`). A synchronous call first broadcasts rank 0's time and text
embeddings to every rank (they change only with the prompt or the schedule, and every change is
followed by synchronous calls).

Each rank times its share of the UNet stage (:class:`StageClock`): the seconds it spends running its
component and the seconds it waits for the component's inputs (the activations; on rank 0, the
noise prediction), apart from the VAE, the scheduler math and the idle time between calls. It keeps
totals in its row of a small shared-memory table that the driver reads when it likes
(:meth:`engine.parallel.sharded.ShardedStream.stage_times`): no message per call.
"""

from __future__ import annotations

import os
import signal
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from engine.config import StreamConfig
from engine.models import ModelSpec, load_components
from engine.parallel.rank_graph import RankGraph
from engine.parallel.costs import _meta_copy, estimate_costs, measure_costs, synchronizer
from engine.parallel.exchange import Packing
from engine.parallel.links import (HIDDEN, Inbox, LinkGroups, Outbox, activation_routes, command_group,
                                   link_pairs)
from engine.parallel.split import UNetSplit, balanced_bounds
from engine.quiet import quiet_libraries
from engine.slots import MATH_DTYPE
from engine.step import StepModels, decode_frames, guide, layout, new_rows, next_buffer, next_stock
from engine.stream import StreamDiffusion
from engine.vae import decode_latents, encode_latents

OP_CALL, OP_STOP = 0, 1
COMPUTE, WAIT, CALLS = 0, 1, 2  # the columns of a rank's row in Channels.stages


@dataclass(frozen=True)
class RankJob:
    """What every rank builds: the model, the stream's shape, the cuts' cost kind, fault injection."""

    model: str
    vae: str
    dtype: str | None
    devices: tuple[str, ...]
    config: StreamConfig
    cost: str = "estimated"
    #: (rank, call): that rank kills itself (SIGKILL) at the start of that call. For tests of failure.
    crash_at: tuple[int, int] | None = None
    #: as :class:`~engine.models.ModelSpec`'s: ``auto`` fuses LCM-LoRA into SD 1.x models that need it
    lcm_lora: str = "none"
    #: replay each rank's calls from CUDA graphs: its component, rank 0's encode and scheduler step, rank k−1's
    #: decode (:mod:`engine.parallel.rank_graph`; on the CPU, stand-ins through the same buffers)
    graphs: bool = False
    #: how long a rank waits for a message before it fails (its group's timeout, the links' groups' too): a rank
    #: waits for the next command as long as the stream is idle
    timeout_s: float = 3600.0


@dataclass
class Channels:
    """The driver's side of the data path: commands in, replies out, frames in shared memory."""

    commands: Any  # multiprocessing queue: driver → rank 0
    replies: Any   # multiprocessing queue: ranks → driver
    #: two slots each (call c uses slot c mod 2), so the driver can start a call before taking the last one's frame
    frames: torch.Tensor  # (2, f, 3, H, W) float32 in [0, 1], written by the driver, read by rank 0
    unit: torch.Tensor    # (2, f, 3, H, W) float32 in [0, 1], written by rank k−1
    pixels: torch.Tensor  # (2, f, H, W, 3) uint8, written by rank k−1
    #: (k, 3) float64, row i written by rank i only: UNet-stage compute seconds, wait seconds, calls (:class:`StageClock`)
    stages: torch.Tensor


def rank_main(rank: int, world: int, job: RankJob, channels: Channels) -> None:
    """A rank's whole life: load, prune to its share, report, serve calls until told to stop."""
    quiet_libraries()
    with torch.inference_mode():
        shard = ShardRank(rank, world, job, channels)
        channels.replies.put(("ready", rank, shard.info()))
        shard.serve()


class ShardRank:
    """This rank's share of the model and its links to the others; :meth:`serve` runs its calls."""

    def __init__(self, rank: int, world: int, job: RankJob, channels: Channels) -> None:
        self.rank, self.world, self.job, self.channels = rank, world, job, channels
        self.last = rank == world - 1
        config = job.config
        components = load_components(ModelSpec(model=job.model, vae=job.vae, lcm_lora=job.lcm_lora, device="cpu",
                                               dtype=job.dtype))
        self.dtype = components.dtype
        self.v_prediction = components.prediction_type == "v_prediction"
        rows = config.unet_batch_size
        self.sample_shape = (rows, components.latent_channels, *config.latent_size)
        self.text_shape = (rows, components.tokenizer.model_max_length, components.unet.config.cross_attention_dim)
        self.device = torch.device(job.devices[rank])
        self.costs, bounds = _cuts(components, config, self.sample_shape, world, job.cost, self.device)
        shapes = _output_shapes(components.unet, bounds, self.sample_shape, self.text_shape[1])
        self.split = UNetSplit(components.unet, bounds)
        self.component = self.split.components[rank]
        latent_size = tuple(self.sample_shape[-2:])
        self.component_call = RankGraph(
            lambda hidden, skips, temb, text: self.split.run(rank, hidden, skips, temb, text, latent_size),
            self.device, graphs=job.graphs, name=f"UNet component {rank}")
        self.decode_call = RankGraph(self._decode, self.device, graphs=job.graphs, name="decode")
        self.temb_shape = self.split.embed(torch.zeros(rows), rows, self.dtype).shape  # rank 0's, still on the CPU
        _prune(components, self.split, rank, world)
        for module in (components.unet, components.vae, components.text_encoder):
            module.to(self.device)
        components.device = self.device
        self.stream = StreamDiffusion(components, config) if rank == 0 else None
        self.models = StepModels(unet=None, vae=components.vae, dtype=self.dtype,  # type: ignore[arg-type]
                                 v_prediction=self.v_prediction)
        if self.stream is not None:  # rank 0's calls before and after the UNet stage, over the stream's slot
            self.index = torch.tensor([self.stream.slot], device=self.device)
            self.encode_call = RankGraph(self._encode, self.device, graphs=job.graphs, name="encode")
            self.step_call = RankGraph(self._step, self.device, graphs=job.graphs, name="scheduler step")
        self.held = _held(components, rank)
        del components
        self._links(shapes)
        self.temb: torch.Tensor | None = None
        self.text: torch.Tensor | None = None
        self.calls = 0
        self.clock = StageClock(self.device, channels.stages[rank])
        self._prepare_graphs()

    def _prepare_graphs(self) -> None:
        """Capture the component's call (and rank 0's encode and step, rank k−1's decode) now, on zeros of the
        shapes they will get: before any transfer is posted."""
        if not self.job.graphs:
            return
        def zeros(shape: torch.Size, dtype: torch.dtype = self.dtype) -> torch.Tensor:
            return torch.zeros(shape, device=self.device, dtype=dtype)

        found: dict[int, torch.Tensor] = {HIDDEN: zeros(self.sample_shape)}  # rank 0: the stream batch's latents
        for box, items in zip(self.inboxes, self.in_items):
            found.update((item, zeros(shape)) for item, shape in zip(items, box.packing.shapes))
        hidden = found.pop(HIDDEN)
        with torch.inference_mode():
            self.component_call.prepare(hidden, found, zeros(self.temb_shape), zeros(self.text_shape))
            if self.last:
                self.decode_call.prepare(zeros(self.finished_in.packing.shapes[0], MATH_DTYPE))
            if self.stream is not None:
                pixels = zeros(self.channels.frames.shape[1:], MATH_DTYPE)
                self.encode_call.prepare(pixels)
                x = self.encode_call(pixels)[1]
                self.step_call.prepare(zeros(self.sample_shape), x)  # prepare copies its inputs
                self.stream.reset()  # the warm-up and capture calls wrote into the slot's buffer and stock noise

    def _decode(self, finished: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rank k−1: the finished latents as frames in [0, 1] and as uint8 pixels, and whether all is finite."""
        decoded, unit, pixels = decode_frames(self.models, finished)  # as one device's call decodes
        return unit, pixels, torch.isfinite(decoded).all()

    # ------------------------------------------------------------------ set-up

    def _links(self, shapes: list[dict[int, torch.Size]]) -> None:
        routes = activation_routes(self.split.components)
        # collective: every rank creates the same groups, here, in the same order
        timeout, cpu = timedelta(seconds=self.job.timeout_s), torch.device("cpu")
        groups = LinkGroups(link_pairs(self.world, routes), timeout)
        groups.connect(self.rank, self.device)
        commands = command_group(timeout)
        latent = torch.Size(self.sample_shape)
        finished = torch.Size((self.job.config.frame_buffer_size, *latent[1:]))
        device, dtype, rank, last = self.device, self.dtype, self.rank, self.world - 1
        self.outboxes = [Outbox(Packing([shapes[r.src][i] for i in r.items]), r.dst, groups(rank, r.dst), device, dtype,
                                "activations") for r in routes if r.src == rank]
        self.out_items = [r.items for r in routes if r.src == rank]
        self.inboxes = [Inbox(Packing([shapes[r.src][i] for i in r.items]), r.src, groups(r.src, rank), device, dtype,
                              "activations") for r in routes if r.dst == rank]
        self.in_items = [r.items for r in routes if r.dst == rank]
        command = Packing([torch.Size([3])])
        self.commands_out = [Outbox(command, r, commands, cpu, torch.long, "command")
                             for r in range(1, self.world)] if rank == 0 else []
        self.command_in = Inbox(command, 0, commands, cpu, torch.long, "command") if rank else None
        if rank == 0:
            self.predictions = Inbox(Packing([latent]), last, groups(last, 0), device, dtype, "prediction")
            self.finished_out = Outbox(Packing([finished]), last, groups(0, last), device, MATH_DTYPE,
                                       "finished latents")
        if self.last:
            self.prediction_out = Outbox(Packing([latent]), 0, groups(last, 0), device, dtype, "prediction")
            self.finished_in = Inbox(Packing([finished]), 0, groups(0, last), device, MATH_DTYPE, "finished latents")

    def info(self) -> dict[str, Any]:
        """What this rank holds and sends: for the driver's report and the tests."""
        sends = {box.dst: box.nbytes for box in self.outboxes}  # one activations message per rank it feeds
        if self.rank == 0:
            sends[self.world - 1] = sends.get(self.world - 1, 0) + self.finished_out.nbytes
        if self.last:
            sends[0] = sends.get(0, 0) + self.prediction_out.nbytes
        return {"rank": self.rank, "blocks": tuple(b.name for b in self.component.blocks),
                "bounds": self.split.bounds, "costs": tuple(self.costs), "sends_bytes": sends, **self.held}

    # ------------------------------------------------------------------ calls

    def serve(self) -> None:
        while True:
            command = self._command()
            if command[0] == OP_STOP:
                break
            self._crash_if_asked()
            sync, slot = bool(command[1]), command[2]
            if sync:
                self._share_embeddings()
            if self.rank == 0:
                self._first(slot)
            else:
                self._later(sync, slot)
            self.calls += 1
        self._drain()

    def _drain(self) -> None:
        """Complete every transfer still in flight (all were matched during the last call) before leaving."""
        for inbox in self.inboxes:
            inbox.wait_pending()
        outboxes = self.outboxes + self.commands_out
        outboxes += [self.finished_out] if self.rank == 0 else []
        outboxes += [self.prediction_out] if self.last else []
        for outbox in outboxes:
            outbox.flush()

    def _command(self) -> tuple[int, int, int]:
        """Rank 0 takes the driver's next command (doing updates and resets on the way) and sends it on.

        Point to point, not a collective: rank 0 starts the next call (encode, component 0) while
        rank k−1 still decodes the last one.
        """
        if self.command_in is not None:
            return tuple(int(v) for v in self.command_in.receive()[0])  # type: ignore[return-value]
        command = self._next_call()
        for box in self.commands_out:
            box.send([command])
        return tuple(int(v) for v in command)  # type: ignore[return-value]

    def _next_call(self) -> torch.Tensor:
        assert self.stream is not None
        while True:
            message = self.channels.commands.get()
            if message[0] == "call":
                return torch.tensor([OP_CALL, int(message[1]), int(message[2])])
            if message[0] == "stop":
                return torch.tensor([OP_STOP, 0, 0])
            if message[0] == "update":
                self.stream.apply_config(message[1])
            elif message[0] == "reset":
                self.stream.reset()

    def _crash_if_asked(self) -> None:
        crash = self.job.crash_at
        if crash is not None and crash == (self.rank, self.calls):
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection for tests: die as a crash would

    def _share_embeddings(self) -> None:
        """Rank 0's time and text embeddings to every rank (synchronous calls only: they change rarely)."""
        shared: list[Any] = [None, None]
        if self.rank == 0:
            assert self.stream is not None
            slot = self.stream.slot
            timesteps = self.stream.slots.timesteps[slot]
            temb = self.split.embed(timesteps, timesteps.shape[0], self.dtype)
            shared = [temb.cpu(), self.stream.slots.embeds[slot].cpu()]
        dist.broadcast_object_list(shared, src=0)
        self.temb, self.text = (t.to(self.device) for t in shared)

    def _first(self, slot: int) -> None:
        """Rank 0: encode, component 0, then (once the prediction is back) the stream's own scheduler math."""
        sample, x = self.encode_call(self.channels.frames[slot].to(self.device))
        self.predictions.post()
        hidden, gives = self._run(sample, {})
        self._send(hidden, gives)
        with self.clock.timing(WAIT):
            prediction = self.predictions.wait()[0]
        self.clock.publish()  # before the finished latents go out: the frame's reply comes after this call's times
        self.finished_out.send([self.step_call(prediction, x)])

    def _encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank 0, before the UNet stage: the new frames encoded and noised, stacked on the buffer (``x``), and
        the UNet's input laid out from it (``sample``, in the model's dtype)."""
        assert self.stream is not None
        shape = self.stream.slots.shape
        state = self.stream.slots.gather(self.index)
        x = torch.cat([new_rows(self.models, shape, state, pixels), state.buffer], 1)
        return layout(x, shape).flatten(0, 1).to(self.dtype), x

    def _step(self, prediction: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Rank 0, after the UNet stage: RCFG and the LCM step on the noise prediction, the buffer moved on in the
        slot; returns the finished latents (``f`` rows) for rank k−1 to decode."""
        assert self.stream is not None
        shape = self.stream.slots.shape
        state = self.stream.slots.gather(self.index)
        sample = layout(x, shape)
        eps = prediction.to(MATH_DTYPE).view(sample.shape)
        if self.v_prediction:  # ε = α·v + β·x, as engine.step._predict
            eps = layout(state.alpha, shape) * eps + layout(state.beta, shape) * sample
        eps, stock = guide(eps, state, shape)
        x0 = state.c_out * (x - state.beta * eps) / state.alpha + state.c_skip * x
        buffer = next_buffer(x0, state, shape.frames)
        if shape.cfg_type in ("self", "initialize"):
            stock = next_stock(eps, stock, state, shape.frames)
        self.stream.slots.scatter(self.index, buffer, stock)
        return x0[:, -shape.frames:].flatten(0, 1)

    def _later(self, sync: bool, slot: int) -> None:
        """Rank i ≥ 1: component i on this call's inputs (sync) or the previous call's (async)."""
        hidden, skips = self._inputs(sync)
        hidden, gives = self._run(hidden, skips)
        self.clock.publish()  # before sending: in a synchronous call the later ranks wait for this one
        if not self.last:
            self._send(hidden, gives)
            return
        self.prediction_out.send([hidden])
        unit, pixels, finite = self.decode_call(self.finished_in.receive()[0])
        self.channels.unit[slot].copy_(unit.cpu())
        self.channels.pixels[slot].copy_(pixels.cpu())
        self.channels.replies.put(("frame", self.calls, bool(finite)))

    def _inputs(self, sync: bool) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        found: dict[int, torch.Tensor] = {}
        with self.clock.timing(WAIT):
            for box, items in zip(self.inboxes, self.in_items):
                if sync:
                    tensors = box.receive()
                else:  # what arrived while the previous call ran; this call's outputs arrive for the next
                    box.wait_pending()
                    tensors = box.wait()
                    box.post()
                found.update(zip(items, tensors))
        hidden = found.pop(HIDDEN)
        return hidden, found

    def _run(self, hidden: torch.Tensor, skips: dict[int, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        assert self.temb is not None and self.text is not None
        with self.clock.timing(COMPUTE):
            return self.component_call(hidden, skips, self.temb, self.text)

    def _send(self, hidden: torch.Tensor, gives: dict[int, torch.Tensor]) -> None:
        outputs = {HIDDEN: hidden, **gives}
        for box, items in zip(self.outboxes, self.out_items):
            box.send([outputs[i] for i in items])


class StageClock:
    """One rank's UNet stage: seconds running its component (:data:`COMPUTE`) and waiting for its inputs (:data:`WAIT`).

    :meth:`publish` ends a call and writes the totals to ``row`` (compute s, wait s, calls) in
    shared memory, where the driver reads them. On the CPU each section is timed with
    ``perf_counter`` (gloo's waits block this thread). On CUDA the work is queued, so the thread's
    clock says nothing: each section is bracketed by events on the current stream. An NCCL wait
    holds the stream, not the thread, so the time between the events around it is how long the
    stream stood idle for its inputs. Nothing synchronises: a call joins the totals once its last
    event has completed, seen at a later :meth:`publish`, so on CUDA the totals may trail by a call
    (``calls`` counts only the calls they hold).
    """

    def __init__(self, device: torch.device, row: torch.Tensor) -> None:
        self.cuda = device.type == "cuda"
        self.row = row
        self.totals = [0.0, 0.0, 0.0]
        self.sections: list[tuple[int, Any, Any]] = []  # this call's (column, start, end)
        self.unfinished: deque[list[tuple[int, Any, Any]]] = deque()  # CUDA: calls whose events are still queued

    @contextmanager
    def timing(self, column: int) -> Iterator[None]:
        start = self._mark()
        yield
        self.sections.append((column, start, self._mark()))

    def publish(self) -> None:
        """End this call's timing: add every completed call to the totals and write them to the shared row."""
        self.unfinished.append(self.sections)
        self.sections = []
        while self.unfinished and self._completed(self.unfinished[0]):
            for column, start, end in self.unfinished.popleft():
                self.totals[column] += self._seconds(start, end)
            self.totals[CALLS] += 1
        self.row.copy_(torch.tensor(self.totals, dtype=torch.float64))

    def _mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _completed(self, sections: list[tuple[int, Any, Any]]) -> bool:
        return not self.cuda or not sections or sections[-1][2].query()  # one stream: the last event is the latest

    def _seconds(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) / 1000.0 if self.cuda else end - start


# ---------------------------------------------------------------------- building a rank


def _cuts(components, config: StreamConfig, sample_shape: tuple[int, ...], world: int, cost: str,
          device: torch.device) -> tuple[list[float], tuple[int, ...]]:
    """Per-block costs and balanced cuts, the same on every rank.

    ``estimated``: multiply-accumulates of the UNet blocks, computed alike everywhere. ``measured``:
    rank 0 times each block on the stream batch on its ``device`` (where the ranks will run them:
    a CPU's profile is not a GPU's), adds the VAE encode to the first block and the decode to the
    last (rank 0 and rank k−1 run them), and shares the cuts.
    """
    unet = components.unet
    text_tokens = components.tokenizer.model_max_length
    if cost == "estimated":
        costs = estimate_costs(unet, sample_shape, text_tokens)
        return costs, balanced_bounds(costs, world)
    shared: list[Any] = [None]
    if dist.get_rank() == 0:
        costs = _measured_costs(components, config, sample_shape, text_tokens, device)
        shared = [(costs, balanced_bounds(costs, world))]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def _measured_costs(components, config: StreamConfig, sample_shape, text_tokens: int,
                    device: torch.device) -> list[float]:
    """Seconds per block on this stream batch on ``device``, the VAE encode added to the first block and the
    decode to the last. The UNet and VAE visit ``device`` for it, and are back on the CPU after, as the other
    ranks' are, to be pruned before they move."""
    unet, vae = components.unet.to(device), components.vae.to(device)
    on = dict(device=device, dtype=components.dtype)
    sample = torch.randn(*sample_shape, **on)
    text = torch.randn(sample_shape[0], text_tokens, unet.config.cross_attention_dim, **on)
    costs = measure_costs(UNetSplit(unet), sample, 500, text)
    frames = torch.rand(config.frame_buffer_size, 3, config.height, config.width, **on)
    sync = synchronizer(device)
    timings = []
    for _ in range(4):  # the first untimed, as measure_costs does
        sync()
        start = time.perf_counter()
        latents = encode_latents(vae, frames)
        sync()
        middle = time.perf_counter()
        decode_latents(vae, latents)
        sync()
        timings.append((middle - start, time.perf_counter() - middle))
    unet.cpu()
    vae.cpu()
    encode, decode = sorted(timings[1:])[1]
    costs[0] += encode
    costs[-1] += decode
    return costs


@torch.inference_mode()
def _output_shapes(unet, bounds, sample_shape, text_tokens: int) -> list[dict[int, torch.Size]]:
    """Each component's outputs (hidden state and skips given) on the stream batch, traced on the meta device."""
    meta = UNetSplit(_meta_copy(unet), bounds)
    rows = sample_shape[0]
    hidden = torch.empty(*sample_shape, device="meta")
    text = torch.empty(rows, text_tokens, unet.config.cross_attention_dim, device="meta")
    temb = meta.embed(torch.zeros((), device="meta"), rows, torch.float32)
    shapes: list[dict[int, torch.Size]] = []
    skips: dict[int, torch.Tensor] = {}
    for component in meta.components:
        hidden, gives = meta.run(component.index, hidden, skips, temb, text, tuple(sample_shape[-2:]))
        skips.update(gives)
        shapes.append({HIDDEN: hidden.shape, **{s: t.shape for s, t in gives.items()}})
    return shapes


def _prune(components, split: UNetSplit, rank: int, world: int) -> None:
    """Drop every weight this rank does not run: other components' blocks, and the VAE and text parts of others."""
    unet = components.unet
    mine = {b.name for b in split.components[rank].blocks}
    for block in split.blocks:
        if block.name not in mine:
            unet.set_submodule(block.name, nn.Identity())
    if rank != 0:
        unet.time_embedding = nn.Identity()  # rank 0 embeds the timesteps and shares the result
        components.text_encoder = _Dropped()
    if rank != world - 1 and unet.conv_norm_out is not None:
        unet.conv_norm_out = nn.Identity()  # part of the output block (run_block applies it before conv_out)
    vae = components.vae
    for name in ("encoder", "quant_conv") if rank != 0 else ():
        if getattr(vae, name, None) is not None:
            setattr(vae, name, nn.Identity())
    for name in ("decoder", "post_quant_conv") if rank != world - 1 else ():
        if getattr(vae, name, None) is not None:
            setattr(vae, name, nn.Identity())


class _Dropped(nn.Module):
    """A text encoder this rank does not hold (only rank 0 encodes prompts)."""


def _held(components, rank: int) -> dict[str, int]:
    def count(module) -> int:
        return sum(p.numel() for p in module.parameters()) if isinstance(module, nn.Module) else 0

    vae = components.vae
    return {"unet_parameters": count(components.unet),
            "vae_encoder_parameters": count(getattr(vae, "encoder", None)) + count(getattr(vae, "quant_conv", None)),
            "vae_decoder_parameters": count(getattr(vae, "decoder", None))
            + count(getattr(vae, "post_quant_conv", None)),
            "text_encoder_parameters": count(components.text_encoder)}
