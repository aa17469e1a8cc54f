"""One owner per device: every model call and every torch operation of the engine runs on its worker.

On a GPU, CUDA work launched from another thread while the worker captures a graph breaks the
capture, and inductor's graph state is per thread. On the CPU the same rule is checked by
recording, for the whole life of an engine (loading, graph capture, sessions opening, prompt
updates, frames, sessions closing, shutdown), which thread called each module, and every torch
operation made on the event loop's thread and on the executor threads.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from engine.config import StreamConfig
from engine.models import ModelSpec
from engine.runtime import Engine, EngineConfig
from tests.test_runtime import lockstep

SIZE = 64
CONFIG = StreamConfig(t_index_list=(20, 40), width=SIZE, height=SIZE, cfg_type="self", prompt="a cat")


class TorchCalls(TorchFunctionMode):
    """Records every torch function and tensor method called on the threads it is entered on."""

    def __init__(self, record: list[tuple[str, str]]) -> None:
        super().__init__()
        self.record = record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", repr(func))
        if name not in NO_DEVICE_WORK:
            self.record.append((threading.current_thread().name, name))
        return func(*args, **(kwargs or {}))


#: torch functions that name a device without running anything on it (resolving --device)
NO_DEVICE_WORK = {"device"}


def pictures(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [(rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8) for _ in range(count)]


async def test_every_model_call_and_tensor_operation_runs_on_the_devices_worker() -> None:
    inputs = pictures(4)  # made before recording starts: the test's own arrays are not the engine's
    module_threads: set[int] = set()
    elsewhere: list[tuple[str, str]] = []

    def record_module_call(module, args) -> None:
        module_threads.add(threading.get_ident())

    hook = torch.nn.modules.module.register_module_forward_pre_hook(record_module_call)
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(4, thread_name_prefix="executor", initializer=TorchCalls(elsewhere).__enter__)
    loop.set_default_executor(executor)
    engine = Engine(EngineConfig(model=ModelSpec("tiny", device="cpu"), stream=CONFIG, backend="torch",
                                 graphs=True, max_sessions=2))  # stand-in graphs: capture runs too
    try:
        with TorchCalls(elsewhere):
            async with engine:
                first = await engine.open_session()
                second = await engine.open_session(prompt="a dog")
                await lockstep(first, inputs[:2])
                second.update(prompt="a bird", guidance_scale=1.5, seed=7)  # text encoder and noise: the worker's
                await lockstep(second, inputs[2:])
                first.close()
                workers = {worker.thread.ident for worker in engine._workers}
    finally:
        hook.remove()
        executor.shutdown(wait=True)
    assert module_threads and module_threads <= workers, "a model ran outside the device's worker"
    assert elsewhere == [], f"torch ran on the event loop or an executor: {sorted(set(elsewhere))[:10]}"


async def test_sessions_open_and_close_on_the_worker_without_leaking_slots(tiny) -> None:
    async with Engine(EngineConfig(stream=CONFIG, max_sessions=2), components=tiny) as engine:
        runner = engine._workers[0].model.runner
        for _ in range(3):  # more opens than slots: closing must give each slot back
            sessions = [await engine.open_session(), await engine.open_session()]
            assert runner.slots.in_use == 2
            for session in sessions:
                session.close()
            await asyncio.wait_for(asyncio.wrap_future(engine._workers[0].submit(lambda: None)), 10)
            assert runner.slots.in_use == 0
