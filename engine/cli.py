"""Command-line pieces every diffcam command shares: the model flags and the spec they make."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from engine.names import BACKEND_CHOICES, DEFAULT_MODEL

if TYPE_CHECKING:
    from engine.models import ModelSpec


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written; defaults shown, but not the empty ones (None, off switches) whose help says what happens."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or "%(default)" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def add_model_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--model --vae --lcm-lora --device --dtype``, with the same meaning in every command."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="hub id, local diffusers folder, .safetensors file, or a preset: tiny, small "
                             "(random weights, for trying things offline)")
    parser.add_argument("--vae", default="tiny", help="tiny (TAESD), full (the model's own), or a TAESD id/folder")
    parser.add_argument("--lcm-lora", default="auto",
                        help="auto (fuse LCM-LoRA into SD 1.x models that need it), none, or a LoRA id/path")
    parser.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda when available")
    parser.add_argument("--dtype", default=None,
                        help="float16/float32/bfloat16 (default: fp16 on CUDA, fp32 on CPU)")


def model_spec(args: argparse.Namespace) -> ModelSpec:
    """The :class:`ModelSpec` the model flags describe."""
    from engine.models import ModelSpec

    return ModelSpec(model=args.model, vae=args.vae, lcm_lora=args.lcm_lora, device=args.device, dtype=args.dtype)


def add_backend_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--backend auto|torch|compile|trt``: what runs the UNet and the VAE (see :mod:`engine.backends`)."""
    parser.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                        help="what runs the UNet and VAE: auto (torch.compile on NVIDIA GPUs, eager torch "
                             "elsewhere), eager torch, torch.compile, or TensorRT engines")
