"""The calls the engine captures as CUDA graphs do nothing a capture forbids, checked on the CPU.

A CUDA graph records the kernels of one call and replays them with no Python and no host in the
loop. So, inside a captured call:

- nothing may wait for the device (``.item()``, ``.tolist()``, ``bool(tensor)``, ``nonzero``,
  boolean-mask indexing): capture fails, and that call size falls back to eager, slow;
- nothing may make or read a host tensor: a copy from host memory is recorded with that memory's
  address, and replays read whatever is there then;
- nothing may draw random numbers: a replay would draw new ones where eager runs draw the stream's
  fixed noise, so outputs would differ from the eager path's.

None of that needs a GPU to check. The captured calls (one device's call for each CFG type, one
and two frames, img2img and txt2img, v-prediction; a sharded rank's UNet component and its decode)
run here on the ``meta`` device, where tensors have shapes and no data, under a dispatch mode that
records every operator: a host tensor anywhere shows as a ``cpu`` tensor among ``meta`` ones, and
a read of a value fails outright (meta tensors have none) or is named by the mode. Rank 0's encode
and scheduler step (``ShardRank._encode``, ``_step``) are not run here, only the step functions
they are made of (:mod:`engine.step`'s, as one device's call).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from engine.components import Components
from engine.config import StreamConfig
from engine.parallel.split import UNetSplit, unet_blocks
from engine.slots import StreamSlots
from engine.step import StepModels, decode_frames, step_models, stream_step

META = torch.device("meta")

#: operators whose result depends on tensor values, so the host must wait for the device
WAITS_FOR_DEVICE = {"_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "is_nonzero", "equal",
                    "_unique", "_unique2", "unique_dim", "unique_consecutive", "repeat_interleave",
                    "_assert_async", "_assert_scalar"}


class CaptureWatch(TorchDispatchMode):
    """Every operator the call runs; :attr:`problems` names those a CUDA graph capture would refuse or get wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.operators = 0
        self.problems: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.operators += 1
        name = func.overloadpacket.__name__
        if name in WAITS_FOR_DEVICE:
            self.problems.append(f"{func} waits for the device")
        if draws_random_numbers(func, args, kwargs):
            self.problems.append(f"{func} draws random numbers")
        try:
            result = func(*args, **kwargs)
        except (NotImplementedError, RuntimeError) as error:  # a value read on meta, or a data-dependent shape
            self.problems.append(f"{func} needs tensor values: {str(error).splitlines()[0]}")
            raise
        host = [tuple(t.shape) for t in tree_leaves((args, kwargs, result))
                if isinstance(t, torch.Tensor) and t.device.type == "cpu"]
        if host:
            self.problems.append(f"{func} touches host tensors of shapes {host}")
        return result


def draws_random_numbers(func, args: tuple, kwargs: dict) -> bool:
    """Whether ``func`` draws: seeded operators do, but for dropout at p = 0 or in eval (as every model here runs)."""
    if torch.Tag.nondeterministic_seeded not in func.tags:
        return False
    name = func.overloadpacket.__name__
    if name == "dropout":  # (input, p, train)
        return bool(args[2]) and args[1] > 0
    if name == "scaled_dot_product_attention":  # (query, key, value, attn_mask, dropout_p, ...)
        return kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0) > 0
    return True


def watched(call: Callable[[], Any]) -> tuple[Any, CaptureWatch]:
    """``call``'s result (None if it raised) and what it ran."""
    watch, result = CaptureWatch(), None
    with torch.inference_mode(), watch:
        try:
            result = call()
        except (NotImplementedError, RuntimeError) as error:
            if not watch.problems:
                raise
            watch.problems.append(f"the call raised {type(error).__name__}")
    return result, watch


def assert_capturable(call: Callable[[], Any]) -> Any:
    result, watch = watched(call)
    assert watch.operators > 10, "the call ran too few operators to have run the model"
    assert not watch.problems, "\n".join(watch.problems)
    return result


@pytest.fixture(scope="module")
def meta(tiny) -> Components:
    """The tiny preset's UNet and VAE on the meta device (the text encoder is not part of any call)."""
    return dataclasses.replace(tiny, unet=copy.deepcopy(tiny.unet).to(META), vae=copy.deepcopy(tiny.vae).to(META),
                               device=META)


CASES = [pytest.param(cfg, frames, id=f"{cfg}-f{frames}") for cfg in ("none", "self", "initialize", "full")
         for frames in (1, 2)]


@pytest.mark.parametrize(("cfg_type", "frames"), CASES)
@pytest.mark.parametrize("txt2img", [False, True], ids=["img2img", "txt2img"])
def test_one_devices_call_is_capturable(meta: Components, cfg_type: str, frames: int, txt2img: bool) -> None:
    config = StreamConfig(t_index_list=(10, 30, 45), width=64, height=64, cfg_type=cfg_type, guidance_scale=1.3,
                          frame_buffer_size=frames, prompt="a red fox")
    slots = StreamSlots.for_config(meta, config, capacity=3)
    index = torch.tensor([2, 0], device=META)
    pixels = None if txt2img else torch.zeros(2 * frames, 3, 64, 64, device=META)
    output = assert_capturable(lambda: stream_step(step_models(meta), slots, index, pixels))
    assert output.pixels.shape == (2 * frames, 64, 64, 3) and output.pixels.dtype == torch.uint8
    assert output.latents_finite.shape == output.pixels_finite.shape == (2,)


def test_a_v_prediction_call_is_capturable(meta: Components) -> None:
    config = StreamConfig(t_index_list=(20, 40), width=64, height=64, cfg_type="self", prompt="ink")
    slots = StreamSlots.for_config(meta, config)
    models = dataclasses.replace(step_models(meta), v_prediction=True)
    assert_capturable(lambda: stream_step(models, slots, torch.tensor([0], device=META),
                                          torch.zeros(1, 3, 64, 64, device=META)))


def test_a_sharded_ranks_calls_are_capturable(meta: Components) -> None:
    """Each rank's UNet component, and the last rank's decode (what :class:`ShardRank` hands :class:`RankGraph`)."""
    unet, rows, latent = meta.unet, 3, (8, 8)
    blocks = len(unet_blocks(unet))
    split = UNetSplit(unet, (0, blocks // 3, 2 * blocks // 3, blocks))
    hidden: torch.Tensor = torch.zeros(rows, unet.config.in_channels, *latent, device=META)
    text = torch.zeros(rows, 77, unet.config.cross_attention_dim, device=META)
    temb = split.embed(torch.zeros(rows, device=META), rows, torch.float32)
    skips: dict[int, torch.Tensor] = {}
    for rank in range(3):
        hidden, gives = assert_capturable(lambda: split.run(rank, hidden, skips, temb, text, latent))
        skips.update(gives)
    assert hidden.shape == (rows, unet.config.out_channels, *latent)
    models = StepModels(unet=None, vae=meta.vae, dtype=torch.float32)  # type: ignore[arg-type]
    unit, pixels = assert_capturable(lambda: decode_frames(models, torch.zeros(2, 4, *latent, device=META)))[1:]
    assert unit.shape == (2, 3, 64, 64) and pixels.dtype == torch.uint8


@pytest.mark.parametrize("mistake", ["item", "host tensor", "random", "mask"])
def test_the_watch_names_what_a_capture_refuses(mistake: str) -> None:
    """The check itself: each kind of mistake in a call is named (so the tests above can fail)."""
    x = torch.ones(4, 4, device=META)

    def call() -> torch.Tensor:
        y = x * 2
        if mistake == "item":
            y = y * float(torch.ones(1).sum().item())  # a value read; on meta it would raise before the mode saw it
        elif mistake == "host tensor":
            y = y + torch.tensor([1.0, 2.0, 3.0, 4.0]).to(META)
        elif mistake == "random":
            y = y + torch.randn(4, 4, device=META)
        else:
            y = y[y > 1]
        return y

    _, watch = watched(call)
    assert watch.problems, f"a call with a {mistake} passed the watch"
