"""The methods ``python -m engine.bench`` times on one device, and the run that times them.

:class:`Bench` builds each way of doing img2img (the stream, the floor, one frame at a time, the
diffusers pipeline) as a callable over a list of frames; :func:`run_methods` times them interleaved
in short rounds; :func:`main` runs them as :mod:`engine.bench`'s flags say. Kept apart from
:mod:`engine.bench`, whose command line answers ``--help`` before torch loads.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from typing import Callable

import numpy as np
import torch

from engine.backends import resolve_backend
from engine.bench import PROMPT, bench_config, environment
from engine.components import Components
from engine.config import StreamConfig
from engine.graphs import CallRunner, stream_runner
from engine.models import ModelSpec, load_components
from engine.parallel.flags import write_json
from engine.presets import PRESETS
from engine.schedule import step_schedule
from engine.stream import StreamDiffusion
from engine.synthetic import moving_frames
from engine.vae import decode_latents, encode_latents

Method = Callable[[list[np.ndarray]], int]


class Bench:
    """Holds the models and the frames; builds each method as a callable over a list of frames."""

    def __init__(self, components: Components, full_vae: torch.nn.Module | None, config: StreamConfig,
                 backends: dict[str, CallRunner] | None = None) -> None:
        self.components, self.full_vae, self.config = components, full_vae, config
        self.backends = backends or {}
        self.device, self.dtype = components.device, components.dtype
        self.schedule = step_schedule(components.scheduler, config.t_index_list, config.num_inference_steps)
        self.cond = StreamDiffusion(components, config).prompts.encode(PROMPT).to(self.dtype)

    def clock(self) -> float:
        """Seconds, once the device has finished what was queued (CUDA runs asynchronously)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def methods(self, with_diffusers: bool) -> dict[str, Method]:
        methods: dict[str, Method] = {"stream": self.stream, "floor": self.floor, "sequential": self.sequential}
        for name, runner in self.backends.items():
            methods[f"stream_{name}"] = lambda frames, r=runner: self.stream(frames, runner=r)
        if with_diffusers and self.full_vae is not None:
            methods["diffusers"] = self._diffusers(self.full_vae)
        if with_diffusers:
            methods["diffusers_same_vae"] = self._diffusers(self.components.vae)
        return methods

    def stream(self, frames: list[np.ndarray], runner: CallRunner | None = None) -> int:
        """Frames out per second of one stream: eager torch, or through ``runner`` (a backend, graphs)."""
        stream = StreamDiffusion(self.components, self.config, runner=runner)
        try:
            for frame in frames[: stream.steps - 1]:  # fill the pipeline first, untimed
                stream(frame)
            started = self.clock()
            outputs = [stream(frame) for frame in frames]
            self.last_elapsed = self.clock() - started
        finally:
            stream.close()
        return sum(output is not None for output in outputs)

    @torch.inference_mode()
    def floor(self, frames: list[np.ndarray], streams: int = 1) -> int:
        """Only the model calls the frames cost, on inputs prepared beforehand: per group of ``streams``
        frames, one VAE encode, one UNet call over ``n·streams`` rows, one VAE decode."""
        groups = [frames[i:i + streams] for i in range(0, len(frames) - streams + 1, streams)]
        images = [torch.cat([self._to_model_input(frame) for frame in group]) for group in groups]
        steps = len(self.schedule)
        latent_h, latent_w = self.config.latent_size
        in_flight = torch.randn((steps - 1) * streams, 4, latent_h, latent_w, device=self.device, dtype=self.dtype)
        timesteps = self.schedule.timesteps.to(self.device).repeat_interleave(streams)
        embeds = self.cond.expand(steps * streams, -1, -1).contiguous()
        unet, vae = self.components.unet, self.components.vae
        started = self.clock()
        for batch in images:
            latents = encode_latents(vae, batch)
            rows = torch.cat([latents, in_flight])
            finished = unet(rows, timesteps, encoder_hidden_states=embeds).sample[-streams:]
            decode_latents(vae, finished)
        self.last_elapsed = self.clock() - started
        return streams * len(images)

    @torch.inference_mode()
    def sequential(self, frames: list[np.ndarray]) -> int:
        """Each frame denoised alone, one UNet call per step, same math and fixed noise as the stream."""
        s = self.schedule
        coef = {k: getattr(s, k).float().to(self.device) for k in ("alpha", "beta", "c_skip", "c_out")}
        latent_h, latent_w = self.config.latent_size
        noise = torch.randn(len(s), 1, 4, latent_h, latent_w, generator=torch.Generator().manual_seed(0))
        noise = noise.to(self.device)
        unet, vae = self.components.unet, self.components.vae
        started = self.clock()
        for frame in frames:
            image = self._to_model_input(frame)
            x = coef["alpha"][0] * encode_latents(vae, image).float() + coef["beta"][0] * noise[0]
            for i, t in enumerate(s.timesteps.tolist()):
                eps = unet(x.to(self.dtype), t, encoder_hidden_states=self.cond).sample.float()
                x0 = coef["c_out"][i] * (x - coef["beta"][i] * eps) / coef["alpha"][i] + coef["c_skip"][i] * x
                if i + 1 < len(s):
                    x = coef["alpha"][i + 1] * x0 + coef["beta"][i + 1] * noise[i + 1]
            decoded = decode_latents(vae, x0.to(self.dtype))
            decoded.add(1).div(2).clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        self.last_elapsed = self.clock() - started
        return len(frames)

    def _diffusers(self, vae: torch.nn.Module) -> Method:
        from diffusers import StableDiffusionImg2ImgPipeline
        from PIL import Image

        c = self.components
        pipe = StableDiffusionImg2ImgPipeline(
            vae=vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet, scheduler=c.scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        timesteps = self.schedule.timesteps.tolist()
        generator = torch.Generator(self.device).manual_seed(0)

        def run(frames: list[np.ndarray]) -> int:
            images = [Image.fromarray(frame) for frame in frames]
            started = self.clock()
            for image in images:
                pipe(PROMPT, image=image, timesteps=timesteps, strength=1.0, guidance_scale=1.0,
                     output_type="np", generator=generator)
            self.last_elapsed = self.clock() - started
            return len(images)

        return run

    def _to_model_input(self, frame: np.ndarray) -> torch.Tensor:
        image = torch.from_numpy(frame).to(self.device).permute(2, 0, 1)[None].float() / 127.5 - 1
        return image.to(self.dtype)


def run_methods(bench: Bench, methods: dict[str, Method], frames: list[np.ndarray], rounds: int) -> dict[str, dict]:
    """Time every method on ``frames`` split into ``rounds`` chunks, interleaved and in rotating order.

    This machine's speed drifts by ±15% over tens of seconds; short interleaved chunks make
    every method see the same drift, so the ratios hold even when the absolute numbers move.
    """
    for method in methods.values():  # one untimed pass each: allocator, kernels, caches
        method(frames[:3])
    chunks = [list(chunk) for chunk in np.array_split(np.arange(len(frames)), rounds) if len(chunk)]
    names = list(methods)
    produced = {name: 0 for name in names}
    elapsed = {name: 0.0 for name in names}
    per_round: dict[str, list[float]] = {name: [] for name in names}
    for index, chunk in enumerate(chunks):
        for name in names[index % len(names):] + names[: index % len(names)]:
            count = methods[name]([frames[i] for i in chunk])
            produced[name] += count
            elapsed[name] += bench.last_elapsed
            per_round[name].append(count / bench.last_elapsed)
        line = "  ".join(f"{name} {per_round[name][-1]:.2f}" for name in names)
        print(f"  round {index + 1}/{len(chunks)}: {line} frames/s", file=sys.stderr)
    return {name: {"fps": produced[name] / elapsed[name], "rounds": per_round[name]} for name in names}


def summarize(results: dict[str, dict], args: argparse.Namespace, config: StreamConfig, device: torch.device) -> dict:
    summary: dict = {f"{name}_fps": r["fps"] for name, r in results.items()}
    stream = summary["stream_fps"]
    for name in results:
        if name != "stream":
            summary[f"stream_over_{name}"] = stream / summary[f"{name}_fps"]
    summary["rounds"] = {name: r["rounds"] for name, r in results.items()}
    summary["config"] = {**asdict(config), "preset": args.preset, "frames": args.frames, "rounds": args.rounds}
    summary["environment"] = environment(device)
    return summary


def print_table(summary: dict) -> None:
    names = [key[: -len("_fps")] for key in summary if key.endswith("_fps")]
    print(f"\n{'method':<20} {'frames/s':>9} {'stream ÷ it':>12}")
    print("-" * 43)
    for name in names:
        ratio = "" if name == "stream" else f"{summary[f'stream_over_{name}']:.2f}"
        print(f"{name:<20} {summary[f'{name}_fps']:>9.2f} {ratio:>12}")
    env, config = summary["environment"], summary["config"]
    print(f"\n{config['preset']} {config['width']}x{config['height']} t_index_list={config['t_index_list']} "
          f"cfg={config['cfg_type']} | torch {env['torch']} on {env['device']}, {env['threads']} threads")


def accelerated(components: Components, config: StreamConfig, args: argparse.Namespace) -> dict[str, CallRunner]:
    """One call runner for ``--backend`` (unless eager torch without graphs), named as its method will be.

    The eager baselines still use the torch modules, so the backend must not free them; the
    runner is made before any stream exists, since capturing graphs writes into its slots.
    """
    backend = resolve_backend(args.backend, components.device)
    graphs = components.device.type == "cuda" if args.graphs is None else args.graphs
    if backend == "torch" and not graphs:
        return {}
    print(f"preparing the {backend} backend" + (" and capturing its call as a graph" if graphs else ""),
          file=sys.stderr)
    runner = stream_runner(components, config, backend, graphs=graphs, release=False)
    return {backend + ("+graphs" if graphs else ""): runner}


def main(args: argparse.Namespace) -> int:
    """Time every method on one device as ``args`` (:mod:`engine.bench`'s flags) say: print the table, write the JSON."""
    config = bench_config(args)
    size = config.width
    components = load_components(ModelSpec(model=args.preset, device=args.device))
    full_vae = None
    if not args.skip_diffusers and (args.preset not in PRESETS or PRESETS[args.preset].kl_channels):
        full_vae = load_components(ModelSpec(model=args.preset, vae="full", device=args.device)).vae
    backends = accelerated(components, config, args)
    bench = Bench(components, full_vae, config, backends)
    frames = moving_frames(args.frames, size, size)
    print(f"benchmarking {args.preset} at {size}x{size}, {args.frames} frames x {args.rounds} rounds", file=sys.stderr)
    results = run_methods(bench, bench.methods(not args.skip_diffusers), frames, args.rounds)
    summary = summarize(results, args, config, components.device)
    print_table(summary)
    write_json(args.json, summary)
    return 0
