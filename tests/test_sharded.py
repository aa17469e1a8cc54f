"""The UNet sharded over 2 and 3 processes for a live stream (gloo, CPU, tiny preset, 64×64, one thread each).

Every comparison is against :class:`StreamDiffusion` on one device, run here on one thread.

- Synchronous calls run the same operations in the same order as one device (each component in
  its own process, on one thread), so they are compared bit for bit: tolerance 0.
- Asynchronous calls on a static input: exact (bit for bit) from the call the module docstring of
  :mod:`engine.parallel.sharded` predicts, ``n + k − 2`` with n − 1 synchronous warm-up calls,
  and not one call earlier.
- Asynchronous calls on a moving input: component 1 sees the previous frame's activations, so
  the output differs by about what one frame of motion changes. The bound: each frame's PSNR
  against one device is at least :data:`MOVING_PSNR_FLOOR` dB, and at least the PSNR between
  one device's output for that frame and for the frame before, less :data:`LATE_MARGIN_DB`:
  never much worse than showing one device's picture one frame late. Another seed, for scale,
  is about 8 dB away.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from datetime import timedelta

import numpy as np
import pytest
import torch

from engine.backends import torch_unet
from engine.config import StreamConfig
from engine.parallel.fidelity import psnr
from engine.parallel.launch import RankFailed
from engine.parallel.links import LinkGroups, activation_routes, command_group, link_pairs
from engine.parallel.sharded import ShardedStream
from engine.parallel.split import make_components, unet_blocks
from engine.stream import StreamDiffusion
from engine.synthetic import moving_frame

CONFIG = StreamConfig(t_index_list=(20, 35), width=64, height=64, cfg_type="self", guidance_scale=1.5,
                      prompt="a red balloon")
STATIC = moving_frame(5, 64, 64)
MOVING_PSNR_FLOOR = 35.0
LATE_MARGIN_DB = 3.0
KILL_DEADLINE_S = 60.0


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def two_ranks():
    with ShardedStream("tiny", CONFIG, procs=2, call_timeout_s=60.0) as stream:
        yield stream
    assert not [p for p in stream.pids if _exists(p)], "a rank outlived close()"


def fresh(stream: ShardedStream, *, resync_every: int | None = None, warmup_calls: int | None = None) -> None:
    """The same ranks as a new stream: state reset, schedule set."""
    n, k = stream.steps, stream.components
    stream.resync_every = resync_every
    stream.warmup_calls = warmup_calls or n + k - 2
    stream.update(**{field: getattr(CONFIG, field) for field in ("prompt", "t_index_list", "guidance_scale")})
    stream.reset()


def both(stream: ShardedStream, tiny, frames: list, updates: dict[int, dict] | None = None,
         config: StreamConfig = CONFIG) -> tuple[list, list]:
    """Sharded and one-device outputs for ``frames``; ``updates[c]`` applied to both before call c."""
    one = StreamDiffusion(tiny, config)
    sharded, single = [], []
    for call, frame in enumerate(frames):
        for target in (stream, one) if call in (updates or {}) else ():
            target.update(**updates[call])
        sharded.append(stream(frame))
        single.append(one(frame))
    return sharded, single


def exact_calls(sharded: list, single: list) -> list[int]:
    return [c for c, (a, b) in enumerate(zip(sharded, single)) if a is not None and np.array_equal(a, b)]


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# --- two processes --------------------------------------------------------------------------------

def test_each_rank_holds_only_its_own_weights(tiny, two_ranks) -> None:
    ranks = two_ranks.ranks
    held = [set(info["blocks"]) for info in ranks]
    assert set.union(*held) == {b.name for b in unet_blocks(tiny.unet)}
    assert not set.intersection(*held), "a block lives on two ranks"
    assert sum(info["unet_parameters"] for info in ranks) == sum(p.numel() for p in tiny.unet.parameters())
    assert all(info["unet_parameters"] > 0 for info in ranks)
    encoder = sum(p.numel() for p in tiny.vae.encoder.parameters())
    decoder = sum(p.numel() for p in tiny.vae.decoder.parameters())
    assert [info["vae_encoder_parameters"] for info in ranks] == [encoder, 0]
    assert [info["vae_decoder_parameters"] for info in ranks] == [0, decoder]
    assert [info["text_encoder_parameters"] > 0 for info in ranks] == [True, False]


def test_synchronous_calls_equal_one_device_bit_for_bit(tiny, two_ranks) -> None:
    fresh(two_ranks, resync_every=1)
    frames = [torch.from_numpy(moving_frame(i, 64, 64)).permute(2, 0, 1).float() / 255 for i in range(6)]
    sharded, single = both(two_ranks, tiny, frames)
    assert two_ranks.sync_history == [True] * 6
    assert sharded[0] is None and single[0] is None  # n − 1 = 1 call to fill the stream batch
    for call in range(1, 6):
        assert torch.equal(sharded[call], single[call]), (call, (sharded[call] - single[call]).abs().max())


def test_static_input_is_exact_from_call_n_plus_k_minus_2(tiny, two_ranks) -> None:
    """With n − 1 = 1 synchronous call, call 1 is off (its prediction saw call 0's empty buffer); 2 on are exact."""
    fresh(two_ranks, warmup_calls=1)
    sharded, single = both(two_ranks, tiny, [STATIC] * 7)
    assert two_ranks.sync_history == [True] + [False] * 6
    n, k = two_ranks.steps, two_ranks.components
    assert exact_calls(sharded, single) == list(range(n + k - 2, 7))
    fresh(two_ranks)  # the default warm-up, n + k − 2 synchronous calls, covers the gap
    sharded, single = both(two_ranks, tiny, [STATIC] * 7)
    assert two_ranks.sync_history == [True] * (n + k - 2) + [False] * (7 - n - k + 2)
    assert exact_calls(sharded, single) == list(range(n - 1, 7))


def test_moving_input_stays_close_to_one_device(tiny, two_ranks, capsys) -> None:
    fresh(two_ranks)
    frames = [moving_frame(i, 64, 64) for i in range(14)]
    sharded, single = both(two_ranks, tiny, frames)
    asynchronous = [c for c, sync in enumerate(two_ranks.sync_history) if not sync]
    scores = {c: psnr(sharded[c], single[c]) for c in asynchronous}
    late = {c: psnr(single[c - 1], single[c]) for c in asynchronous}
    seeds = psnr(single[-1], both_seed(tiny, frames)[-1])
    with capsys.disabled():
        print("\nsharded async vs one device, PSNR per call (dB):", {c: round(v, 1) for c, v in scores.items()})
        print("one device, one frame late (dB):", {c: round(v, 1) for c, v in late.items()}, f"other seed: {seeds:.1f}")
    assert min(scores.values()) >= MOVING_PSNR_FLOOR > seeds + 20
    assert all(scores[c] >= late[c] - LATE_MARGIN_DB for c in asynchronous), (scores, late)
    assert max(scores.values()) < 100.0, "the asynchronous calls changed nothing: are they asynchronous?"


def both_seed(tiny, frames: list) -> list:
    one = StreamDiffusion(tiny, replace(CONFIG, seed=CONFIG.seed + 1))
    return [one(frame) for frame in frames]


def test_resync_every_n_makes_every_nth_call_exact(tiny, two_ranks) -> None:
    """N = 4, warm-up 2: calls 4m and 4m + 1 are synchronous, and 4m + 1 finishes a frame that never left them."""
    fresh(two_ranks, resync_every=4)
    frames = [moving_frame(i, 64, 64) for i in range(12)]
    sharded, single = both(two_ranks, tiny, frames)
    assert two_ranks.sync_history == [True, True, False, False] * 3
    assert exact_calls(sharded, single) == [1, 5, 9]


def test_update_resyncs_and_a_static_scene_stays_exact(tiny, two_ranks) -> None:
    fresh(two_ranks)
    updates = {4: {"prompt": "a blue house"}, 8: {"guidance_scale": 2.0}}
    sharded, single = both(two_ranks, tiny, [STATIC] * 12, updates)
    assert two_ranks.sync_history == [True, True, False, False] * 3
    assert exact_calls(sharded, single) == list(range(1, 12))
    assert not np.array_equal(sharded[3], sharded[7]), "the prompt changed nothing"


def test_two_calls_in_flight_give_the_same_frames(two_ranks) -> None:
    """submit() the next frame before taking the last one's result(): the same frames, bit for bit, as one at a time."""
    frames = [moving_frame(i, 64, 64) for i in range(10)]
    fresh(two_ranks, resync_every=5)
    one_at_a_time = [two_ranks(frame) for frame in frames]
    history = list(two_ranks.sync_history)
    fresh(two_ranks, resync_every=5)
    two_ranks.submit([frames[0]])
    pipelined = []
    for frame in frames[1:]:
        two_ranks.submit([frame])
        with pytest.raises(RuntimeError, match="2 calls are in flight"):
            two_ranks.submit([frame])
        pipelined.append(two_ranks.result())
    pipelined.append(two_ranks.result())
    assert two_ranks.sync_history == history and False in history
    assert pipelined[0] is None and one_at_a_time[0] is None
    assert all(np.array_equal(a, b[0]) for a, b in zip(one_at_a_time[1:], pipelined[1:]))


def test_rank_graphs_replay_the_same_frames(two_ranks) -> None:
    """Each rank's component and the last rank's decode over static buffers (CPU stand-ins for the CUDA graphs: a
    re-run per replay) give the eager ranks' frames bit for bit, synchronous and asynchronous calls on moving
    video alike: every input (hidden state, skips, embeddings, which change with the prompt and the schedule,
    the finished latents) reaches the static buffers each call."""
    frames = [moving_frame(i, 64, 64) for i in range(8)]
    update = {"prompt": "a green kite", "t_index_list": (15, 30)}  # new text and time embeddings
    fresh(two_ranks, resync_every=4)
    eager = [two_ranks(frame) if c != 5 else (two_ranks.update(**update), two_ranks(frame))[1]
             for c, frame in enumerate(frames)]
    with ShardedStream("tiny", CONFIG, procs=2, resync_every=4, graphs=True, call_timeout_s=60.0) as graphed:
        assert graphed.graphs
        replayed = [graphed(frame) if c != 5 else (graphed.update(**update), graphed(frame))[1]
                    for c, frame in enumerate(frames)]
        assert graphed.sync_history == two_ranks.sync_history[-len(frames):] and False in graphed.sync_history
    fresh(two_ranks)  # the module's stream back to CONFIG for the tests after this one
    assert eager[0] is None and replayed[0] is None
    assert all(np.array_equal(a, b) for a, b in zip(eager[1:], replayed[1:]))


def test_what_crosses_between_ranks(two_ranks) -> None:
    """Rank 0 sends component 0's hidden state and skips plus the finished latent; rank 1 the prediction."""
    rows, latent = CONFIG.unet_batch_size, 4 * 8 * 8
    assert two_ranks.ranks[1]["sends_bytes"] == {0: rows * latent * 4}
    assert two_ranks.ranks[0]["sends_bytes"][1] > rows * latent * 4
    assert two_ranks.bytes_per_call == sum(sum(i["sends_bytes"].values()) for i in two_ranks.ranks)


# --- three processes ------------------------------------------------------------------------------

def test_three_ranks_three_steps_and_no_guidance(tiny) -> None:
    """k = 3, n = 3, RCFG ``none``: synchronous calls exact; a static input exact from n + k − 2 = 4, not before.
    With the components over static buffers (``graphs``; stand-ins on the CPU), so a middle rank's too."""
    config = replace(CONFIG, t_index_list=(10, 25, 40), cfg_type="none")
    with ShardedStream("tiny", config, procs=3, resync_every=1, warmup_calls=1, call_timeout_s=60.0,
                       graphs=True) as stream:
        assert len({info["blocks"] for info in stream.ranks}) == 3
        assert set(stream.ranks[1]["sends_bytes"]) == {2}  # its hidden state, to rank 2 only
        assert set(stream.ranks[2]["sends_bytes"]) == {0}  # the prediction
        frames = [moving_frame(i, 64, 64) for i in range(5)]
        sharded, single = both(stream, tiny, frames, config=config)
        assert exact_calls(sharded, single) == [2, 3, 4]
        stream.resync_every, stream.warmup_calls = None, 2  # n − 1 synchronous calls
        stream.reset()
        sharded, single = both(stream, tiny, [STATIC] * 8, config=config)
        assert exact_calls(sharded, single) == list(range(4, 8))
    assert not [p for p in stream.pids if _exists(p)]


def test_the_commands_go_over_one_gloo_group_of_every_rank() -> None:
    """A group of all ranks: with the default group NCCL bound to a device, a rank outside a new group joins a split
    of the default communicator that a gloo group's members never join, so pair groups would hang k >= 3 on GPUs."""
    made: list[tuple] = []

    def new_group(ranks, timeout, backend) -> object:
        made.append((ranks, timeout, backend))
        return object()

    command_group(timedelta(hours=5), new_group)
    assert made == [(None, timedelta(hours=5), "gloo")]


def test_cuts_from_block_times_measured_on_the_ranks_device(tiny) -> None:
    """``cost="measured"``: rank 0 times the blocks and the VAE where the ranks run them, shares the cuts, and the
    model it timed is pruned like the others' (synchronous calls exact)."""
    with ShardedStream("tiny", CONFIG, procs=2, cost="measured", resync_every=1, call_timeout_s=60.0) as stream:
        costs = stream.ranks[0]["costs"]
        assert all(c > 0 for c in costs) and costs == stream.ranks[1]["costs"] and sum(costs) < 5
        assert stream.ranks[0]["bounds"] == stream.ranks[1]["bounds"]
        sharded, single = both(stream, tiny, [moving_frame(i, 64, 64) for i in range(3)])
        assert exact_calls(sharded, single) == [1, 2]


def test_routes_send_each_skip_straight_to_its_reader(tiny) -> None:
    a, b, c = make_components(unet_blocks(tiny.unet), (0, 2, 5, 7))
    routes = {(r.src, r.dst): r.items for r in activation_routes((a, b, c))}
    assert routes == {(0, 1): (-1, 3), (0, 2): (0, 1, 2), (1, 2): (-1,)}


def test_each_direction_of_a_link_has_its_own_group(tiny) -> None:
    """NCCL matches a pair's messages by order and runs them on one stream per group: rank 0's early receive of the
    prediction would block its own send of the activations to rank k−1 were both directions one group. Every rank
    must also create the same groups in the same order (``new_group`` is collective)."""
    routes = activation_routes(make_components(unet_blocks(tiny.unet), (0, 2, 5, 7)))
    pairs = link_pairs(3, routes)
    assert pairs == [(0, 1), (0, 2), (1, 2), (2, 0)]  # activations (and finished latents), the prediction back
    created: list[list[int]] = []

    def new_group(ranks: list[int], timeout: timedelta) -> object:
        assert timeout == timedelta(hours=5)  # the stream's, not torch's default (10 minutes on NCCL)
        created.append(ranks)
        return object()

    groups = LinkGroups(reversed(pairs), timedelta(hours=5), new_group)  # any order in, one order out
    assert created == [[0, 1], [0, 2], [1, 2], [0, 2]]
    assert groups(0, 2) is not groups(2, 0)
    assert len({id(groups(*pair)) for pair in pairs}) == len(pairs)
    with pytest.raises(KeyError, match="no link from rank 1 to rank 0"):
        groups(1, 0)
    assert link_pairs(2, activation_routes(make_components(unet_blocks(tiny.unet), (0, 3, 7)))) == [(0, 1), (1, 0)]


# --- failures and configuration -------------------------------------------------------------------

def test_a_killed_rank_is_reported_and_no_rank_is_left(tiny) -> None:
    """One step with full CFG (a real negative pass, twice the rows): exact while synchronous, then rank 1 dies."""
    config = replace(CONFIG, t_index_list=(30,), cfg_type="full", negative_prompt="blurry")
    stream = ShardedStream("tiny", config, procs=2, crash_at=(1, 4), call_timeout_s=60.0)
    assert stream.warmup_calls == 1
    one = StreamDiffusion(tiny, config)
    assert np.array_equal(stream(STATIC), one(STATIC))  # n = 1: the synchronous first call is exact
    with pytest.raises(RankFailed, match=r"rank 1 \(pid \d+\) was killed by SIGKILL") as failure:
        for index in range(1, 10):
            start = time.monotonic()
            stream(moving_frame(index, 64, 64))
    assert time.monotonic() - start < KILL_DEADLINE_S
    assert failure.value.rank == 1 and index == 4
    with pytest.raises(RankFailed):
        stream(STATIC)  # still reported, not hanging
    stream.close()
    assert len(stream.pids) == 2 and not [p for p in stream.pids if _exists(p)]


@pytest.mark.parametrize("kwargs,message", [
    (dict(procs=1), "at least 2 ranks"),
    (dict(procs=2, devices=("cpu", "cpu")), "not both"),
    (dict(devices=("cpu", "cuda:0")), "all 'cpu' or all CUDA"),
    (dict(devices=("cuda:0", "cuda:0")), "its own CUDA device"),
    (dict(procs=2, resync_every=0), "resync_every=0"),
    (dict(procs=2, warmup_calls=0), "warmup_calls=0"),
    (dict(procs=2, cost="guess"), "cost='guess'"),
])
def test_bad_settings_are_refused_before_any_process_starts(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ShardedStream("tiny", CONFIG, **kwargs)


def test_shapes_the_sharded_stream_does_not_run_are_refused() -> None:
    with pytest.raises(ValueError, match="similarity_filter"):
        ShardedStream("tiny", replace(CONFIG, similarity_filter=True), procs=2)
    with pytest.raises(ValueError, match="img2img only"):
        ShardedStream("tiny", replace(CONFIG, mode="txt2img"), procs=2)


# --- the UNet stage, timed on each rank -----------------------------------------------------------

STAGE_FACTOR = 5.0  # the components' compute against one device's UNet: a bound for a shared 2-core machine


class _TimedUNet:
    """The torch UNet, adding up the seconds its calls take (on the CPU: no synchronising needed)."""

    def __init__(self, unet) -> None:
        self.run, self.seconds = torch_unet(unet), 0.0

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        try:
            return self.run(*args)
        finally:
            self.seconds += time.perf_counter() - start


def test_each_rank_reports_its_unet_stage_times(tiny, two_ranks) -> None:
    """Each rank's seconds running its component and waiting for its inputs, one count per call, from reset().

    Synchronous calls run the whole UNet, one component after the other, so the components' compute
    adds up to about one device's UNet time for the same calls (the time embedding aside). The bound
    is generous: the machine is shared, and no test asserts a speed.
    """
    fresh(two_ranks, resync_every=1)
    assert [(s.calls, s.compute_s, s.wait_s) for s in two_ranks.stage_times()] == [(0, 0.0, 0.0)] * 2
    unet = _TimedUNet(tiny.unet)
    one = StreamDiffusion(tiny, CONFIG, unet)
    for index in range(10):
        frame = moving_frame(index, 64, 64)
        two_ranks(frame)
        one(frame)
    stages = two_ranks.stage_times()
    assert [(s.rank, s.calls) for s in stages] == [(0, 10), (1, 10)]
    assert all(s.compute_s > 0 and s.wait_s > 0 for s in stages), stages
    ratio = sum(s.compute_s for s in stages) / unet.seconds
    assert 1 / STAGE_FACTOR < ratio < STAGE_FACTOR, (stages, unet.seconds)
    fresh(two_ranks)  # asynchronous after the warm-up; counted afresh from the reset
    for index in range(5):
        two_ranks(moving_frame(index, 64, 64))
    later = two_ranks.stage_times()
    assert [s.calls for s in later] == [5, 5] and all(s.compute_per_call > 0 for s in later)
    assert later[0].since(later[0]).calls == 0
