"""One stream-batch call over ``k`` streams (StreamDiffusion, arXiv 2312.12491), with residual CFG.

Everything a call does on the device, from fitted pixels to output pixels, in one function
of fixed-shape tensors: the engine runs it eagerly, or captures it once per ``k`` as a CUDA
graph and replays it (:mod:`engine.graphs`). It reads each stream's state from its slot
(:mod:`engine.slots`) and writes the new state back last, so a call that raises changes nothing.

Per stream, rows are step-major: row ``i·f + j`` holds frame slot ``j`` at step ``i``
(``n`` steps, ``f`` frames). The call takes ``f`` new frames per stream, noises them to step 0,
stacks them on the ``(n-1)·f`` rows in flight, runs ONE UNet call over every stream's rows,
decodes the ``f`` rows that reached the last step and moves every other row one step on.
Scheduler math runs in float32 whatever the model dtype. The pieces around the UNet call
(:func:`new_rows`, :func:`guide`, :func:`next_buffer`, :func:`next_stock`, :func:`layout`) are
public: a sharded stream's rank 0 (:mod:`engine.parallel.shard_rank`) runs the same ones around
its UNet component, so both paths share one definition of the stream's math.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.backends import UNetFn, torch_unet
from engine.components import Components, Vae
from engine.slots import MATH_DTYPE, Gathered, StreamShape, StreamSlots
from engine.vae import decode_latents, encode_latents


@dataclass(frozen=True)
class StepModels:
    """What a call runs: the UNet function, the VAE, and how to read the UNet's prediction."""

    unet: UNetFn
    vae: Vae
    dtype: torch.dtype
    v_prediction: bool = False


def step_models(components: Components, unet: UNetFn | None = None) -> StepModels:
    """What :func:`stream_step` runs for ``components`` (with ``unet``, else the torch UNet)."""
    return StepModels(unet or torch_unet(components.unet), components.vae, components.dtype,
                      components.prediction_type == "v_prediction")


@dataclass(frozen=True)
class StepOutput:
    """A call's results, ``k·f`` frames stream-major; flags per stream."""

    unit: torch.Tensor            # (k·f, 3, H, W) float32 in [0, 1]
    pixels: torch.Tensor          # (k·f, H, W, 3) uint8
    latents_finite: torch.Tensor  # (k,) bool: False means the stream's state is NaN/inf
    pixels_finite: torch.Tensor   # (k,) bool: False means only the decoded picture is


def stream_step(models: StepModels, slots: StreamSlots, index: torch.Tensor,
                pixels: torch.Tensor | None) -> StepOutput:
    """One call for the streams in slots ``index``: ``pixels`` ``(k·f, 3, H, W)`` in [0, 1], or None for txt2img."""
    shape, state = slots.shape, slots.gather(index)
    x = torch.cat([new_rows(models, shape, state, pixels), state.buffer], 1)  # n = 1: the buffer has no rows
    eps, stock = guide(_predict(models, shape, state, x), state, shape)
    x0 = state.c_out * (x - state.beta * eps) / state.alpha + state.c_skip * x
    buffer = next_buffer(x0, state, shape.frames)
    if shape.cfg_type in ("self", "initialize"):
        stock = next_stock(eps, stock, state, shape.frames)
    finished = x0[:, -shape.frames:]
    decoded, unit, pixels = decode_frames(models, finished.flatten(0, 1))
    output = StepOutput(
        unit=unit,
        pixels=pixels,
        latents_finite=_finite(buffer) & _finite(finished),
        pixels_finite=_finite(decoded.reshape(len(index), -1)),  # reshape: channels_last on CUDA
    )
    slots.scatter(index, buffer, stock)
    return output


def decode_frames(models: StepModels, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``latents`` decoded: the VAE's output, frames ``(N, 3, H, W)`` float32 in [0, 1], pixels ``(N, H, W, 3)`` uint8."""
    decoded = decode_latents(models.vae, latents.to(models.dtype))
    unit = decoded.float().add(1.0).div(2.0).clamp(0.0, 1.0)
    return decoded, unit, unit.mul(255.0).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def new_rows(models: StepModels, shape: StreamShape, state: Gathered, pixels: torch.Tensor | None) -> torch.Tensor:
    """The ``f`` rows entering at step 0: encoded frames noised with the stream's fixed noise (txt2img: the noise)."""
    f = shape.frames
    if pixels is None:
        return state.noise[:, :f]
    latents = encode_latents(models.vae, pixels.mul(2.0).sub(1.0).to(models.dtype)).to(MATH_DTYPE)
    latents = latents.view(len(state.noise), f, *latents.shape[1:])
    return state.alpha[:, :f] * latents + state.beta[:, :f] * state.noise[:, :f]


def _predict(models: StepModels, shape: StreamShape, state: Gathered, x: torch.Tensor) -> torch.Tensor:
    """The UNet's noise prediction for every stream's rows, laid out as :func:`layout`, in float32."""
    sample = layout(x, shape)
    prediction = models.unet(sample.flatten(0, 1).to(models.dtype), state.timesteps.flatten(),
                             state.embeds.flatten(0, 1))
    prediction = prediction.to(MATH_DTYPE).view(sample.shape)
    if models.v_prediction:  # ε = α·v + β·x
        return layout(state.alpha, shape) * prediction + layout(state.beta, shape) * sample
    return prediction


def guide(eps: torch.Tensor, state: Gathered, shape: StreamShape) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual CFG: the guided ``ε̂`` for the ``n·f`` rows, and the stock noise it used.

    Guidance applies where ``guidance_scale > 1``, as in StreamDiffusion and diffusers; at or
    below 1 a stream gets the conditional prediction alone (in ``self`` mode the formula would
    otherwise pull ``ε̂`` towards the noise that was added, and echo the camera as ``g → 0``).
    Per stream, so the graph is the same whatever each stream's setting.
    """
    cfg, f, stock = shape.cfg_type, shape.frames, state.stock
    if cfg == "none":
        return eps, stock
    guided = state.guidance > 1.0
    if cfg == "full":
        eps_uncond, eps_cond = eps.chunk(2, dim=1)
    else:
        if cfg == "initialize":  # the real negative pass on the new frames refreshes their stock noise
            stock = torch.where(guided, torch.cat([eps[:, :f], stock[:, f:]], 1), stock)
            eps = eps[:, f:]
        eps_cond, eps_uncond = eps, state.delta * stock
    return torch.where(guided, eps_uncond + state.guidance * (eps_cond - eps_uncond), eps_cond), stock


def next_stock(eps: torch.Tensor, stock: torch.Tensor, state: Gathered, f: int) -> torch.Tensor:
    """Residual noise each row carries to its next step (StreamDiffusion's stock-noise update).

    ``Δ = c_out·(β·s − β·ε̂)/α + c_skip·β·s``; a row moving from step i to i+1 gets
    ``ε_{i+1} + (α_{i+1}/β_{i+1})·Δ_i``; new frames enter with the noise they were given, ``ε_0``.
    """
    scaled = state.beta * stock
    delta = state.c_out * (scaled - state.beta * eps) / state.alpha + state.c_skip * scaled
    moved = state.noise[:, f:] + state.alpha[:, f:] / state.beta[:, f:] * delta[:, :-f]
    return torch.cat([state.noise[:, :f], moved], 1)


def next_buffer(x0: torch.Tensor, state: Gathered, f: int) -> torch.Tensor:
    """Rows at steps 0..n-2 re-noised to their next step: ``α_{i+1}·x0_i (+ β_{i+1}·ε_{i+1})``."""
    return state.alpha[:, f:] * x0[:, :-f] + state.add_noise * state.beta[:, f:] * state.noise[:, f:]


def layout(rows: torch.Tensor, shape: StreamShape) -> torch.Tensor:
    """Per-row values ``(k, n·f, …)`` laid out like each stream's UNet rows: ``[uncond rows, cond rows]``."""
    if shape.cfg_type == "full":
        return torch.cat([rows, rows], 1)
    if shape.cfg_type == "initialize":
        return torch.cat([rows[:, :shape.frames], rows], 1)
    return rows


def _finite(values: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(values).flatten(1).all(1)
