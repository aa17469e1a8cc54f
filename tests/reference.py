"""Sequential img2img built only from diffusers and transformers parts — never from engine code.

It is what the stream batch must equal: each frame denoised step after step with
``LCMScheduler.step`` (its ``denoised`` output), re-noised to the next chosen timestep with
``LCMScheduler.add_noise`` and the stream's documented fixed noise.
"""

from __future__ import annotations

import torch
from diffusers import LCMScheduler


def stream_noise(seed: int, steps: int, frames: int, channels: int, height: int, width: int) -> torch.Tensor:
    """The documented noise draw: one ``randn`` of ``(n·f, C, h, w)`` from a CPU generator seeded with ``seed``."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((steps * frames, channels, height // 8, width // 8), generator=generator)


def encode_prompt(components, prompt: str) -> torch.Tensor:
    tokenizer = components.tokenizer
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return components.text_encoder(ids)[0]


def timesteps(components, t_index_list, num_inference_steps: int = 50) -> list[int]:
    scheduler = LCMScheduler.from_config(components.scheduler.config)
    scheduler.set_timesteps(num_inference_steps)
    return [int(scheduler.timesteps[i]) for i in t_index_list]


def lcm_denoised(components, eps: torch.Tensor, t: int, x: torch.Tensor, num_inference_steps: int = 50):
    scheduler = LCMScheduler.from_config(components.scheduler.config)
    scheduler.set_timesteps(num_inference_steps)
    return scheduler.step(eps, t, x).denoised


def add_noise(components, x0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
    scheduler = LCMScheduler.from_config(components.scheduler.config)
    return scheduler.add_noise(x0, noise, torch.tensor([t]))


@torch.no_grad()
def sequential_img2img(components, image: torch.Tensor, t_index_list, noises: list[torch.Tensor],
                       cond: torch.Tensor, uncond: torch.Tensor | None = None, guidance: float = 1.0,
                       do_add_noise: bool = True) -> torch.Tensor:
    """``image`` (3×H×W in [0, 1]) → output image in [0, 1]; ``noises[i]`` noises step ``i``.

    With ``uncond`` given, classifier-free guidance the textbook way: a real negative pass,
    ``ε = ε_u + g·(ε_c − ε_u)``.
    """
    vae, unet = components.vae, components.unet
    z = vae.encode(image[None] * 2 - 1).latents * vae.config.scaling_factor
    ts = timesteps(components, t_index_list)
    x = add_noise(components, z, noises[0][None], ts[0])
    for i, t in enumerate(ts):
        eps = unet(x, t, encoder_hidden_states=cond).sample
        if uncond is not None:
            eps_uncond = unet(x, t, encoder_hidden_states=uncond).sample
            eps = eps_uncond + guidance * (eps - eps_uncond)
        x0 = lcm_denoised(components, eps, t, x)
        if i + 1 < len(ts):
            if do_add_noise:
                x = add_noise(components, x0, noises[i + 1][None], ts[i + 1])
            else:
                alphas = LCMScheduler.from_config(components.scheduler.config).alphas_cumprod
                x = alphas[ts[i + 1]].sqrt() * x0
    decoded = vae.decode(x0 / vae.config.scaling_factor).sample
    return ((decoded[0] + 1) / 2).clamp(0, 1)
