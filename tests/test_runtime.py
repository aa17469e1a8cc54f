"""The asyncio runtime: newest-frame-wins, isolation, batching, faults, capacity, metrics."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import tracemalloc

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from engine.batch import NonFiniteOutputError
from engine.config import StreamConfig
from engine.models import ModelSpec
from engine.runtime import Engine, EngineConfig
from engine.session import EngineBusyError, FrameError, SessionClosedError
from engine.stream import StreamDiffusion
from tests.reference import encode_prompt

SIZE = 64


def engine_config(**overrides) -> EngineConfig:
    stream = overrides.pop("stream", StreamConfig(t_index_list=(20, 40), width=SIZE, height=SIZE, cfg_type="self",
                                                  guidance_scale=1.4, prompt="a cat", seed=4))
    return EngineConfig(stream=stream, **overrides)


def frame(seed: int) -> torch.Tensor:
    coarse = torch.rand((1, 3, 8, 8), generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear")[0]


async def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.002)


async def lockstep(session, frames) -> list:
    """Submit one frame at a time, waiting until the worker has taken it through the model."""
    outputs = []
    for k, picture in enumerate(frames):
        done = session.metrics.processed + session.metrics.errors + 1
        session.submit(picture, pts=k)
        await wait_until(lambda: session.metrics.processed + session.metrics.errors >= done)
        await asyncio.sleep(0)  # let the delivery callback run
        if session._output is not None:
            outputs.append(await session.next_output())
    return outputs


def solo(components, config: StreamConfig, frames) -> list:
    stream = StreamDiffusion(components, config)
    return [out for out in (stream(picture) for picture in frames) if out is not None]


class PoisonUNet:
    """The real UNet, except rows conditioned on the poison prompt raise (or turn NaN)."""

    def __init__(self, components, poison: str, mode: str = "raise", delay: float = 0.0) -> None:
        self.unet, self.mode, self.delay = components.unet, mode, delay
        self.poison = encode_prompt(components, poison)[0]
        self.calls = 0
        self.inside = threading.Event()

    def __call__(self, sample, timesteps, encoder_hidden_states):
        self.calls += 1
        self.inside.set()
        time.sleep(self.delay)
        out = self.unet(sample, timesteps, encoder_hidden_states=encoder_hidden_states).sample
        poisoned = (encoder_hidden_states - self.poison).abs().amax(dim=(1, 2)) < 1e-6
        if poisoned.any():
            if self.mode == "raise":
                raise RuntimeError("poisoned row")
            out[poisoned] = float("nan")
        return out


async def test_newest_frame_wins_and_counts_add_up(tiny) -> None:
    config = engine_config(stream=StreamConfig(t_index_list=(30,), width=SIZE, height=SIZE, cfg_type="none"))
    async with Engine(config, components=tiny) as engine:
        session = await engine.open_session()
        pictures = [frame(i) for i in range(5)]
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for k in range(1000):
            session.submit(pictures[k % 5].clone(), pts=k)  # far faster than the model runs
        grown = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        last = None
        while last is None or last.frame_id != 999:
            last = await asyncio.wait_for(session.next_output(), 10)
        m = session.metrics
        assert m.frames_in == 1000
        assert m.dropped + m.processed == 1000
        assert m.processed < 100 and m.dropped > 900, "stale frames are dropped, not queued"
        assert grown < 2_000_000, f"1000 submitted frames left {grown} bytes behind"
        assert last.pts == 999


async def test_sessions_are_isolated_and_equal_their_solo_runs(tiny) -> None:
    config = engine_config()
    frames_a, frames_b = [frame(i) for i in range(6)], [frame(100 + i) for i in range(6)]
    async with Engine(config, components=tiny) as engine:
        a = await engine.open_session(prompt="a red fox")
        b = await engine.open_session(prompt="a blue whale", guidance_scale=2.0, seed=11)
        out_a, out_b = await asyncio.gather(lockstep(a, frames_a), lockstep(b, frames_b))
    expected_a = solo(tiny, config.stream.with_updates(prompt="a red fox"), frames_a)
    expected_b = solo(tiny, config.stream.with_updates(prompt="a blue whale", guidance_scale=2.0, seed=11), frames_b)
    assert len(out_a) == len(expected_a) == 5
    for got, want in zip(out_a, expected_a):
        torch.testing.assert_close(got.frame, want, atol=1e-4, rtol=0)
    for got, want in zip(out_b, expected_b):
        torch.testing.assert_close(got.frame, want, atol=1e-4, rtol=0)
    assert [o.frame_id for o in out_a] == [0, 1, 2, 3, 4], "each output carries the id of its input"


async def test_three_sessions_share_unet_calls_and_match_solo(tiny) -> None:
    config = engine_config()
    prompts = ["ink drawing", "neon city", "oil painting"]
    inputs = [[frame(10 * s + k) for k in range(8)] for s in range(3)]
    async with Engine(config, components=tiny) as engine:
        sessions = [await engine.open_session(prompt=p) for p in prompts]
        outputs: list[list] = [[], [], []]
        for k in range(8):
            for s, session in enumerate(sessions):
                session.submit(inputs[s][k], pts=k)
            await wait_until(lambda: all(x.metrics.processed == k + 1 for x in sessions))
            await asyncio.sleep(0)
            for s, session in enumerate(sessions):
                if session._output is not None:
                    outputs[s].append(await session.next_output())
        histogram = engine.snapshot()["batch_size_histogram"]
    assert max(histogram) >= 2, f"no combined UNet call: {histogram}"
    assert sum(size * count for size, count in histogram.items()) == 24
    for s in range(3):
        expected = solo(tiny, config.stream.with_updates(prompt=prompts[s]), inputs[s])
        assert len(outputs[s]) == len(expected) == 7
        for got, want in zip(outputs[s], expected):
            torch.testing.assert_close(got.frame, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode,cause", [("raise", RuntimeError), ("nan", NonFiniteOutputError)])
async def test_a_faulty_frame_fails_its_session_only(tiny, mode, cause) -> None:
    unet = PoisonUNet(tiny, "explode", mode)
    async with Engine(engine_config(), components=tiny, unet=unet) as engine:
        bad = await engine.open_session(prompt="explode")
        good = await engine.open_session(prompt="a calm lake")
        for k in range(4):
            bad.submit(frame(k), pts=k)
            good.submit(frame(k + 50), pts=k)
            await wait_until(lambda: good.metrics.processed == k + 1 and bad.metrics.errors == k + 1)
        with pytest.raises(FrameError) as raised:
            await asyncio.wait_for(bad.next_output(), 5)
        assert isinstance(raised.value.__cause__, cause)
        assert (await asyncio.wait_for(good.next_output(), 5)).frame is not None
        assert good.metrics.errors == 0 and bad.metrics.processed == 0
        bad.update(prompt="a calm lake")  # the bad session recovers once its frames are fine
        bad.submit(frame(9))
        await wait_until(lambda: bad.metrics.processed == 1)


async def test_closing_mid_frame_and_shutdown_leak_nothing(tiny) -> None:
    threads_before = set(threading.enumerate())
    tasks_before = asyncio.all_tasks()
    unet = PoisonUNet(tiny, "unused", delay=0.3)
    async with Engine(engine_config(shutdown_timeout=3.0), components=tiny, unet=unet) as engine:
        session = await engine.open_session()
        session.submit(frame(0))
        await asyncio.to_thread(unet.inside.wait, 5)
        session.close()  # while the worker is inside the model with this session's frame
        with pytest.raises(SessionClosedError):
            await session.next_output()
        await asyncio.sleep(0.5)
        assert engine.snapshot()["sessions_active"] == 0
        other = await engine.open_session()
        other.submit(frame(1))
        other.submit(frame(2))
        await asyncio.sleep(0.05)  # the engine now shuts down with a frame in flight
        started = time.monotonic()
    assert time.monotonic() - started < 3.0 + 1.0, "shutdown honours its time limit"
    gc.collect()
    assert asyncio.all_tasks() == tasks_before
    # the event loop's own executor threads (asyncio_N) belong to the loop and end with it
    assert {t for t in threading.enumerate() if not t.name.startswith("asyncio_")} == threads_before
    with pytest.raises(SessionClosedError):
        other.submit(frame(3))


async def test_capacity_is_a_typed_error(tiny) -> None:
    async with Engine(engine_config(max_sessions=2), components=tiny) as engine:
        first, _ = await engine.open_session(), await engine.open_session()
        with pytest.raises(EngineBusyError, match="all 2 sessions are in use"):
            await engine.open_session()
        first.close()
        await engine.open_session()
        snap = engine.snapshot()
        assert (snap["sessions_opened"], snap["sessions_closed"], snap["sessions_rejected"]) == (3, 1, 1)


async def test_bad_parameters_are_refused_at_the_boundary(tiny) -> None:
    async with Engine(engine_config(), components=tiny) as engine:
        with pytest.raises(ValueError, match="guidance_scale=99"):
            await engine.open_session(guidance_scale=99)
        session = await engine.open_session()
        with pytest.raises(ValueError, match="width"):
            session.update(width=128)
        with pytest.raises(ValueError, match="strength=-1"):
            session.update(strength=-1)
        assert engine.snapshot()["sessions_active"] == 1
    with pytest.raises(ValueError, match="frame_buffer_size=2"):
        EngineConfig(stream=StreamConfig(frame_buffer_size=2))


async def test_updates_take_effect_on_the_next_output(tiny) -> None:
    config = engine_config(stream=StreamConfig(t_index_list=(35,), width=SIZE, height=SIZE, cfg_type="self",
                                               guidance_scale=1.5, prompt="a cat"))
    pictures = [frame(i) for i in range(4)]
    async with Engine(config, components=tiny) as engine:
        session = await engine.open_session()
        before = await lockstep(session, pictures[:2])
        session.update(prompt="a dog", strength=0.8, similarity_filter=True, similarity_threshold=0.99)
        after = await lockstep(session, pictures[2:])
    reference = StreamDiffusion(tiny, config.stream)
    expected = [reference(p) for p in pictures[:2]]
    reference.update(prompt="a dog", strength=0.8, similarity_filter=True, similarity_threshold=0.99)
    expected += [reference(p) for p in pictures[2:]]
    for got, want in zip(before + after, expected):
        torch.testing.assert_close(got.frame, want, atol=1e-4, rtol=0)


async def test_metrics_match_what_happened(tiny) -> None:
    async with Engine(engine_config(), components=tiny) as engine:
        session = await engine.open_session()
        outputs = await lockstep(session, [frame(i) for i in range(5)])
        snap = engine.snapshot()
        text = engine.prometheus().decode()
    m = snap["sessions"][session.id]
    assert (m["frames_in"], m["processed"], m["dropped"], m["errors"]) == (5, 5, 0, 0)
    assert m["outputs"] == len(outputs) == 4, "n - 1 = 1 warm-up call gives no output"
    assert 0 < m["latency_ms"]["p50"] <= m["latency_ms"]["p95"] <= m["latency_ms"]["max"]
    assert snap["unet_calls"] == 5 and snap["batch_size_histogram"] == {1: 5}
    assert 0 < snap["worker_busy_seconds"]
    families = {f.name: f for f in text_string_to_metric_families(text)}
    processed = families["diffcam_session_processed"].samples
    assert [(s.labels["session"], s.value) for s in processed] == [(session.id, 5.0)]
    assert families["diffcam_unet_calls"].samples[0].value == 5.0


async def test_a_session_nobody_reads_is_closed_after_the_idle_timeout(tiny) -> None:
    async with Engine(engine_config(idle_timeout=0.3), components=tiny) as engine:
        session = await engine.open_session()
        session.submit(frame(0))
        await wait_until(lambda: session.closed, timeout=5)
        with pytest.raises(SessionClosedError):
            await session.next_output()
        assert engine.snapshot()["sessions_expired"] == 1


async def test_a_waiting_reader_keeps_its_session_open(tiny) -> None:
    async with Engine(engine_config(idle_timeout=0.2), components=tiny) as engine:
        session = await engine.open_session()
        reader = asyncio.create_task(session.next_output())
        await asyncio.sleep(0.6)
        assert not session.closed
        session.close()
        with pytest.raises(SessionClosedError):
            await reader


async def test_round_robin_gives_every_session_its_turn(tiny) -> None:
    async with Engine(engine_config(max_batch=1), components=tiny) as engine:
        sessions = [await engine.open_session(prompt=p) for p in ("one", "two", "three")]
        pictures = [frame(i) for i in range(3)]
        deadline = time.monotonic() + 60.0  # a count, not a time: this machine's speed varies threefold
        while min(s.metrics.processed for s in sessions) < 5 and time.monotonic() < deadline:
            for session, picture in zip(sessions, pictures):  # every session always has a frame waiting
                session.submit(picture)
            await asyncio.sleep(0.002)
        counts = [s.metrics.processed for s in sessions]
        histogram = engine.snapshot()["batch_size_histogram"]
    assert set(histogram) == {1}, "max_batch=1: one session per UNet call"
    assert min(counts) >= 5 and max(counts) - min(counts) <= 1, counts


async def test_a_failed_decode_names_the_right_frame_and_later_ids_stay_right(tiny, monkeypatch) -> None:
    """A call that raises changes nothing: the frame it was given fails, the frames in flight go on."""
    import engine.step

    real_decode, calls = engine.step.decode_latents, []

    def flaky_decode(vae, latents):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("decoder hiccup")
        return real_decode(vae, latents)

    monkeypatch.setattr(engine.step, "decode_latents", flaky_decode)
    async with Engine(engine_config(), components=tiny) as engine:  # n = 2: frame k leaves at call k + 1
        session = await engine.open_session()
        seen = []
        for k in range(6):
            done = session.metrics.processed + session.metrics.errors + 1
            session.submit(frame(k), pts=k)
            await wait_until(lambda: session.metrics.processed + session.metrics.errors >= done)
            await asyncio.sleep(0)
            if session._output is not None:
                try:
                    seen.append((await session.next_output()).frame_id)
                except FrameError as error:
                    seen.append(f"error {error.frame_id}")
    assert seen == ["error 1", 0, 2, 3, 4]


async def test_a_failing_parameter_update_changes_nothing_and_is_reported(tiny, monkeypatch) -> None:
    async with Engine(engine_config(), components=tiny) as engine:
        session = await engine.open_session(prompt="a cat")
        await lockstep(session, [frame(0), frame(1)])

        def broken_encoder(prompt):
            raise RuntimeError("text encoder out of memory")

        monkeypatch.setattr(session.stream.prompts, "encode_weighted", broken_encoder)
        session.update(prompt="a dog", guidance_scale=2.0)
        session.submit(frame(2))
        with pytest.raises(FrameError, match="text encoder out of memory"):
            await asyncio.wait_for(session.next_output(), 5)
        assert session.stream.config.prompt == "a cat" and session.stream.config.guidance_scale == 1.4
        assert session.config.prompt == "a cat", "the session reports what is really in force"
        monkeypatch.undo()
        session.update(prompt="a dog")
        await lockstep(session, [frame(3)])
        assert session.stream.config.prompt == "a dog"


async def test_updates_made_while_the_worker_applies_one_are_not_lost(tiny) -> None:
    async with Engine(engine_config(), components=tiny) as engine:
        session = await engine.open_session()
        session.update(prompt="a cat")
        session.submit(frame(0))
        session.update(guidance_scale=1.9)  # may land while the worker applies the first update
        await lockstep(session, [frame(1), frame(2)])
        assert (session.stream.config.prompt, session.stream.config.guidance_scale) == ("a cat", 1.9)


async def test_busy_for_counts_the_running_round_and_is_zero_between_rounds(tiny) -> None:
    # what a replica watches to tell a device that hangs (it raises nothing) from one that serves
    release = threading.Event()

    def held(module, args) -> None:
        release.wait(30)

    hook = tiny.unet.register_forward_pre_hook(held)
    try:
        async with Engine(engine_config(), components=tiny) as engine:
            assert engine.busy_for() == 0.0
            session = await engine.open_session()
            session.submit(frame(0))
            await wait_until(lambda: engine.busy_for() > 0.3)
            release.set()
            await wait_until(lambda: engine.idle)
            assert engine.busy_for() == 0.0 and session.metrics.processed == 1
    finally:
        hook.remove()
        release.set()


async def test_sessions_spread_over_workers_and_none_opens_during_shutdown(tiny) -> None:
    config = EngineConfig(model=ModelSpec("tiny"), devices=("cpu", "cpu"), max_sessions=8,
                          stream=StreamConfig(t_index_list=(30,), width=SIZE, height=SIZE, cfg_type="none"))
    engine = Engine(config)
    await engine.start()
    try:
        await asyncio.gather(*(engine.open_session() for _ in range(4)))
        assert sorted(len(w._sessions) for w in engine._workers) == [2, 2]
        opening = asyncio.create_task(engine.open_session())
        await asyncio.sleep(0)
        await engine.aclose()
        with pytest.raises(RuntimeError, match="shut down while the session was being opened"):
            await opening
        assert engine.sessions() == []
    finally:
        await engine.aclose()
