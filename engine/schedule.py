"""Per-step coefficients of the stream batch, taken from diffusers' ``LCMScheduler``.

For each chosen step ``i`` (``t_i = timesteps[t_index_list[i]]``): ``alpha = sqrt(ᾱ_t)``,
``beta = sqrt(1 - ᾱ_t)``, and LCM's boundary-condition scalings ``c_skip``, ``c_out``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers import LCMScheduler


@dataclass(frozen=True)
class StepSchedule:
    """One entry per denoising step, as 1-D float64 tensors (and ``timesteps`` as int64)."""

    timesteps: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    c_skip: torch.Tensor
    c_out: torch.Tensor

    def __len__(self) -> int:
        return len(self.timesteps)

    def per_row(self, name: str, frames: int, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Coefficient ``name`` repeated for ``frames`` rows per step, shaped ``(n·f, 1, 1, 1)``."""
        values = getattr(self, name).repeat_interleave(frames)
        return values.to(device=device, dtype=dtype).view(-1, 1, 1, 1)


def step_schedule(scheduler: LCMScheduler, t_index_list: Sequence[int], num_inference_steps: int) -> StepSchedule:
    """Coefficients for ``t_index_list`` out of an LCM schedule of ``num_inference_steps``."""
    lcm = LCMScheduler.from_config(scheduler.config)
    try:
        lcm.set_timesteps(num_inference_steps)
    except ValueError as error:
        raise ValueError(f"num_inference_steps={num_inference_steps} does not fit this model's LCM schedule: {error}")
    timesteps = lcm.timesteps[list(t_index_list)].long()
    alphas_cumprod = lcm.alphas_cumprod.double()[timesteps]
    scalings = [lcm.get_scalings_for_boundary_condition_discrete(int(t)) for t in timesteps]
    return StepSchedule(
        timesteps=timesteps,
        alpha=alphas_cumprod.sqrt(),
        beta=(1 - alphas_cumprod).sqrt(),
        c_skip=torch.tensor([s[0] for s in scalings], dtype=torch.float64),
        c_out=torch.tensor([s[1] for s in scalings], dtype=torch.float64),
    )
