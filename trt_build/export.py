"""ONNX export of the UNet and the VAE halves, with the real stream-batch shapes.

Each part is wrapped so its ONNX graph takes exactly what the engine hands it:

- ``unet``: ``sample (B, C, h, w)``, ``timestep (B,)`` float32 (one timestep per row: the stream
  batch holds every denoising step at once), ``encoder_hidden_states (B, 77, D)`` → the model's
  prediction ``(B, C, h, w)``;
- ``vae_encoder``: ``images (N, 3, H, W)`` in [-1, 1] → scaled latents, exactly
  :func:`engine.vae.encode_latents` (the KL VAE gives its mean);
- ``vae_decoder``: scaled latents → images in [-1, 1], exactly :func:`engine.vae.decode_latents`.

Batch (and, when the profile asks, height and width) are dynamic axes. The sample inputs are
the profile's ``opt`` shapes, so tracing sees the shapes the stream really uses.

The TorchScript exporter (``dynamo=False``) is used on purpose: in torch 2.13 the dynamo
exporter specialises the batch range and emits opset-18 ``Split`` nodes even when asked for
opset 17, which onnxruntime then refuses; the TorchScript path gives a clean opset-17 graph
that TensorRT's parser takes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from engine.components import Components
from engine.vae import decode_latents, encode_latents
from trt_build.shapes import LATENT_SCALE, ShapeProfile, ShapeTriple

OPSET = 17
PARTS = ("unet", "vae_encoder", "vae_decoder")


class UNetForExport(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class VaeForExport(torch.nn.Module):
    """One direction of the VAE: ``encode_latents`` or ``decode_latents``, scaling included."""

    def __init__(self, vae: torch.nn.Module, direction: Callable[[Any, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.vae, self.direction = vae, direction

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.direction(self.vae, tensor)


@dataclass(frozen=True)
class ExportSpec:
    """One part to export: the module, its named inputs with their shape ranges and dtypes, its output.

    ``axes`` names the dynamic axes of every input and of the output: ``batch``, and
    ``height``/``width`` in pixels or ``latent_height``/``latent_width`` in latent cells, so the
    graph knows which dimensions are the same.
    """

    part: str
    module: torch.nn.Module
    shapes: dict[str, ShapeTriple]
    dtypes: dict[str, torch.dtype]
    output: str
    axes: dict[str, dict[int, str]]

    @property
    def input_names(self) -> list[str]:
        return list(self.shapes)

    def sample_inputs(self, device: torch.device, shape_index: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
        """Seeded inputs at the profile's ``opt`` shapes (``shape_index`` 0 / 2 for min / max)."""
        generator = torch.Generator("cpu").manual_seed(seed)
        inputs = {}
        for name, triple in self.shapes.items():
            shape = triple[shape_index]
            if name == "timestep":  # plausible LCM timesteps, noisiest first, as the stream lays them out
                value = torch.linspace(999, 1, shape[0]).round()
            else:
                value = torch.randn(shape, generator=generator)
                value = value.clamp(-1, 1) if name == "images" else value
            inputs[name] = value.to(device=device, dtype=self.dtypes[name])
        return inputs


def export_specs(components: Components, profile: ShapeProfile) -> dict[str, ExportSpec]:
    """What to export for ``components`` under ``profile``, one spec per part."""
    profile.check_divisible(unet_multiple(components))
    channels, width, dtype = components.latent_channels, int(components.text_encoder.config.hidden_size), components.dtype
    unet = profile.unet_shapes(channels, width)
    encoder, decoder = profile.vae_encoder_shapes(), profile.vae_decoder_shapes(channels)
    latent_axes = _named_axes(unet["sample"], "latent_")
    return {
        "unet": ExportSpec(
            "unet", UNetForExport(components.unet), unet,
            {"sample": dtype, "timestep": torch.float32, "encoder_hidden_states": dtype}, "latent",
            {"sample": latent_axes, "timestep": _named_axes(unet["timestep"]),
             "encoder_hidden_states": _named_axes(unet["encoder_hidden_states"]), "latent": latent_axes}),
        "vae_encoder": ExportSpec(
            "vae_encoder", VaeForExport(components.vae, encode_latents), encoder, {"images": dtype}, "latents",
            {"images": _named_axes(encoder["images"]), "latents": _named_axes(decoder["latents"], "latent_")}),
        "vae_decoder": ExportSpec(
            "vae_decoder", VaeForExport(components.vae, decode_latents), decoder, {"latents": dtype}, "images",
            {"latents": _named_axes(decoder["latents"], "latent_"), "images": _named_axes(encoder["images"])}),
    }


def unet_multiple(components: Components) -> int:
    """Pixels per side must divide by this: 8 for the VAE times 2 per UNet downsampling."""
    levels = len(components.unet.config.block_out_channels)
    return LATENT_SCALE * 2 ** (levels - 1)


def export_onnx(spec: ExportSpec, path: Path, device: torch.device) -> Path:
    """Trace ``spec`` at its ``opt`` shapes and write an opset-17 ONNX file (external data past 2 GB)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    inputs = spec.sample_inputs(device)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings about code we do not own
        torch.onnx.export(spec.module.eval(), tuple(inputs.values()), str(path), input_names=spec.input_names,
                          output_names=[spec.output], dynamic_axes=_dynamic_only(spec.axes), opset_version=OPSET,
                          do_constant_folding=True, dynamo=False)
    return path


def _named_axes(triple: ShapeTriple, spatial: str = "") -> dict[int, str]:
    """Names for the axes of an input laid out (batch, ..., height, width) whose range is not fixed."""
    low, _, high = triple
    names = {0: "batch"} if len(low) < 4 else {0: "batch", 2: f"{spatial}height", 3: f"{spatial}width"}
    return {axis: name for axis, name in names.items() if low[axis] != high[axis]}


def _dynamic_only(axes: dict[str, dict[int, str]]) -> dict[str, dict[int, str]]:
    return {name: named for name, named in axes.items() if named}
