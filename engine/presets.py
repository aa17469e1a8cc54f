"""Random-weight models built in-process, for tests (``tiny``) and CPU benchmarks (``small``).

Nothing is downloaded: weights come from a fixed seed, so the same preset gives the same
weights every time, on every machine. The tokenizer is the byte-level CLIP vocabulary shipped
in ``assets/tiny_tokenizer``. Pictures from these models are abstract: the weights are random.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, LCMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from engine.components import Components
from engine.tokenizer_vocab import TINY_TOKENIZER_DIR

PRESET_SEED = 0


@dataclass(frozen=True)
class PresetSpec:
    """What a preset builds; ``sizes`` say what it was made for, not a limit."""

    block_out_channels: tuple[int, ...]
    attention_heads: int | tuple[int, ...]
    norm_groups: int
    text_width: int
    text_layers: int
    taesd_channels: int
    taesd_blocks: int
    kl_channels: tuple[int, ...] | None
    default_size: int
    linear_projection: bool = False
    text_heads: int = 4
    text_mlp_ratio: int = 2
    text_activation: str = "quick_gelu"
    kl_norm_groups: int = 16
    #: (encoder, decoder) blocks per TAESD level; None: ``taesd_blocks`` at every level
    taesd_layout: tuple[tuple[int, ...], tuple[int, ...]] | None = None


PRESETS: dict[str, PresetSpec] = {
    # ~0.4 M-parameter UNet: runs the whole img2img path at well over 10 fps on 2 CPU cores.
    "tiny": PresetSpec((32, 64), 2, 32, 32, 2, 16, 1, None, 128),
    # An SD-shaped (4-level, 3 cross-attention levels) UNet of ~14 M parameters for 256x256.
    "small": PresetSpec((40, 80, 160, 160), 5, 8, 256, 2, 32, 1, (32, 64, 128, 128), 256),
    # sd-turbo's architecture exactly (SD 2.1 UNet, 866 M parameters; an OpenCLIP-H-shaped text
    # encoder; TAESD, or SD's KL VAE with vae="full"), with random weights: for GPU benchmarks,
    # since speed does not depend on the weights. Only the tokenizer is the small test one.
    "sd-turbo-random": PresetSpec(
        (320, 640, 1280, 1280), (5, 10, 20, 20), 32, 1024, 23, 64, 3, (128, 256, 512, 512), 512,
        linear_projection=True, text_heads=16, text_mlp_ratio=4, text_activation="gelu", kl_norm_groups=32,
        taesd_layout=((1, 3, 3, 3), (3, 3, 3, 1))),
}


def is_preset(name: str) -> bool:
    return name in PRESETS


def build_preset(name: str, *, vae: str = "tiny", device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> Components:
    """Build preset ``name`` with seeded random weights; ``vae`` is ``tiny`` (TAESD-shaped) or ``full``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    spec = PRESETS[name]
    tokenizer = load_tiny_tokenizer()
    unet = _seeded(lambda: amplify_prompt(_unet(spec)), 1)
    autoencoder = _seeded(lambda: calibrate_vae(_vae(spec, vae, name)), 2)
    text_encoder = _seeded(lambda: _text_encoder(spec, tokenizer), 3)
    for module in (unet, autoencoder, text_encoder):
        module.to(device=device, dtype=dtype)
    return Components(  # after the casts: it keeps a VAE that asks for fp32 (force_upcast) in fp32
        name=name,
        unet=unet,
        vae=autoencoder,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1),
        device=torch.device(device),
        dtype=dtype,
    )


def load_tiny_tokenizer() -> CLIPTokenizer:
    """The byte-level CLIP tokenizer from ``assets/tiny_tokenizer`` (77 tokens, like CLIP)."""
    vocab = json.loads((TINY_TOKENIZER_DIR / "vocab.json").read_text("utf-8"))
    merges = (TINY_TOKENIZER_DIR / "merges.txt").read_text("utf-8").splitlines()[1:]
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges if m], model_max_length=77)


def _seeded(build: Callable[[], torch.nn.Module], offset: int) -> torch.nn.Module:
    """Build under a fixed seed without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(PRESET_SEED + offset)
        return build()


def _unet(spec: PresetSpec) -> UNet2DConditionModel:
    levels = len(spec.block_out_channels)
    down = ("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1)
    if levels == 2:  # the diffusers test layout: attention at the low-resolution level only
        down, up = ("DownBlock2D", "CrossAttnDownBlock2D"), ("CrossAttnUpBlock2D", "UpBlock2D")
    return UNet2DConditionModel(
        sample_size=spec.default_size // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=spec.block_out_channels,
        layers_per_block=2,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=spec.text_width,
        attention_head_dim=spec.attention_heads,
        norm_num_groups=spec.norm_groups,
        use_linear_projection=spec.linear_projection,
    )


def _vae(spec: PresetSpec, kind: str, name: str) -> AutoencoderKL | AutoencoderTiny:
    if kind == "tiny":
        channels = (spec.taesd_channels,) * 4
        encoder_blocks, decoder_blocks = spec.taesd_layout or ((spec.taesd_blocks,) * 4,) * 2
        return AutoencoderTiny(
            encoder_block_out_channels=channels,
            decoder_block_out_channels=channels,
            num_encoder_blocks=encoder_blocks,
            num_decoder_blocks=decoder_blocks,
            latent_channels=4,
        )
    if kind == "full" and spec.kl_channels is not None:
        return AutoencoderKL(
            block_out_channels=spec.kl_channels,
            down_block_types=("DownEncoderBlock2D",) * len(spec.kl_channels),
            up_block_types=("UpDecoderBlock2D",) * len(spec.kl_channels),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=spec.kl_norm_groups,
            scaling_factor=0.18215,
        )
    allowed = ["tiny", "full"] if spec.kl_channels is not None else ["tiny"]
    raise ValueError(f"vae={kind!r} is not available for preset {name!r}; choose from {allowed}")


CROSS_ATTENTION_GAIN = 8.0


@torch.no_grad()
def amplify_prompt(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """Scale the cross-attention outputs so the prompt visibly steers a random UNet's picture.

    With plain random weights a prompt change moves the output by ~2 grey levels, less than
    video-codec noise; ×8 makes it ~7, so tests through WebRTC can see a prompt change.
    """
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            module.to_out[0].weight.mul_(CROSS_ATTENTION_GAIN)
            module.to_out[0].bias.mul_(CROSS_ATTENTION_GAIN)
    return unet


@torch.no_grad()
def calibrate_vae(vae: AutoencoderKL | AutoencoderTiny) -> AutoencoderKL | AutoencoderTiny:
    """Rescale a random VAE's last layers so latents have unit spread and pictures use the colour range.

    Random weights otherwise give latents ~0.04 wide (drowned by the noise) and decode to flat
    black. Deterministic: the probe images come from the current (seeded) RNG.
    """
    probe = torch.rand(2, 3, 64, 64) * 2 - 1
    if isinstance(vae, AutoencoderTiny):
        encoder_out, decoder_out, decoder_target = vae.encoder.layers[-1], vae.decoder.layers[-1], (0.5, 0.2)
    else:
        encoder_out, decoder_out, decoder_target = vae.quant_conv, vae.decoder.conv_out, (0.0, 0.4)
    latents = vae.encode(probe)
    latents = latents.latents if hasattr(latents, "latents") else latents.latent_dist.mode()
    gain = 1.0 / (vae.config.scaling_factor * latents.std())  # unit spread after scaling
    encoder_out.weight.mul_(gain)
    encoder_out.bias.sub_(latents.mean()).mul_(gain)
    _match_output(vae, decoder_out, torch.randn(2, 4, 8, 8), *decoder_target)
    return vae


def _match_output(vae, layer: torch.nn.Conv2d, latents: torch.Tensor, mean: float, std: float) -> None:
    """Scale ``layer`` so the values it emits have ``mean`` and ``std`` per channel."""
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
    vae.decode(latents)
    handle.remove()
    out = captured[0]
    out_mean, out_std = out.mean(dim=(0, 2, 3)), out.std(dim=(0, 2, 3)).clamp_min(1e-6)
    layer.weight.mul_((std / out_std).view(-1, 1, 1, 1))
    layer.bias.copy_((layer.bias - out_mean) * std / out_std + mean)


def _text_encoder(spec: PresetSpec, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_width,
        intermediate_size=spec.text_width * spec.text_mlp_ratio,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        hidden_act=spec.text_activation,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)
