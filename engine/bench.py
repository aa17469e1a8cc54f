"""Engine benchmark: ``python -m engine.bench --preset small --t-index-list 0,16,32,45 --frames 40 --json out.json``.

Runs the same moving synthetic frames through five ways of doing img2img, in one process,
interleaved in short rounds so machine drift hits them all alike (frames/s = all frames / all time):

- ``stream``: our stream batch (:class:`engine.stream.StreamDiffusion`), frames out per second;
- ``floor``: the bare model work for the same frames (VAE encode + one batched UNet call + VAE
  decode per frame), the physical floor of this machine;
- ``sequential``: the same denoising one frame at a time, one UNet call per step;
- ``diffusers``: ``StableDiffusionImg2ImgPipeline`` per frame, same UNet weights and steps, with the
  model's own full VAE: what a user would otherwise write;
- ``diffusers_same_vae``: that pipeline given our (tiny) VAE, to separate the VAE's share of the gain.

With ``--devices`` naming several, it runs the parallel benchmark ``--parallel`` picks instead:
``asyncdiff`` :mod:`engine.parallel.bench_stream` (one stream sharded over the devices against one
device), ``replicas`` :mod:`engine.parallel.bench_replicas` (concurrent streams, one whole model
per device, against one process), passing on the flags it shares with this one.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from dataclasses import asdict
from typing import Callable

import numpy as np
import torch

from engine.backends import BACKEND_CHOICES, resolve_backend
from engine.components import Components
from engine.quiet import quiet_libraries
from engine.config import StreamConfig, parse_t_index_list
from engine.models import ModelSpec, load_components
from engine.parallel.flags import add_parallel_arguments, given_flags, write_json
from engine.presets import PRESETS
from engine.schedule import step_schedule
from engine.graphs import CallRunner, stream_runner
from engine.stream import StreamDiffusion
from engine.synthetic import moving_frames
from engine.vae import decode_latents, encode_latents

PROMPT = "a watercolor painting of a city street"
SEVERAL_DEVICES = """\
--devices naming two or more runs a parallel benchmark instead, passing on those of the flags
above that you give and it shares: --preset (as --model), --size, --t-index-list, --threads,
--json; with asyncdiff --frames (as --calls); with replicas --sessions, --duration (as --seconds)
and --warmup. For the rest it keeps its own defaults (see its --help)."""
Method = Callable[[list[np.ndarray]], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", help="model preset (tiny, small) or any --model spec")
    parser.add_argument("--t-index-list", default="0,16,32,45", help="denoising steps out of 50")
    parser.add_argument("--frames", type=int, default=40, help="frames timed per method")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds the frames are split into")
    parser.add_argument("--size", type=int, default=None, help="square frame size (default: the preset's)")
    parser.add_argument("--cfg-type", default="none", choices=["none", "full", "self", "initialize"])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--skip-diffusers", action="store_true", help="leave out the diffusers baselines")
    parser.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                        help="also time the stream on this backend (stream_<backend>) unless it is eager torch; "
                             "the runtime benchmark uses it (auto: compile on CUDA, torch elsewhere)")
    parser.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="replay each call as a CUDA graph (stream_<backend>+graphs; default: on CUDA)")
    parser.add_argument("--json", default=None, help="write the results here")
    runtime = parser.add_argument_group("runtime benchmark (--runtime)")
    runtime.add_argument("--runtime", action="store_true",
                         help="drive the asyncio runtime with concurrent synthetic streams instead")
    runtime.add_argument("--sessions", default="1,2,4", help="concurrent stream counts to measure")
    runtime.add_argument("--offer-fps", type=float, default=30.0,
                         help="frames/s each stream offers (far above capacity, e.g. 400 on a GPU, measures capacity)")
    runtime.add_argument("--floor-calls", type=int, default=4, help="calls per floor chunk (more on a GPU)")
    runtime.add_argument("--duration", type=float, default=24.0, help="measured seconds per session count")
    runtime.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before the first window")
    several = parser.add_argument_group("several devices", SEVERAL_DEVICES)
    add_parallel_arguments(several, devices="the devices (one alone: the same as --device)",
                           default="default: replicas with --runtime (python -m engine.parallel.bench_replicas: "
                                   "concurrent streams, one process per device), asyncdiff otherwise (python -m "
                                   "engine.parallel.bench_stream: one sharded stream against one device)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


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


def bench_config(args: argparse.Namespace) -> StreamConfig:
    """The stream configuration both benchmarks use: square frames at the preset's size by default."""
    size = args.size or (PRESETS[args.preset].default_size if args.preset in PRESETS else 512)
    return StreamConfig(t_index_list=parse_t_index_list(args.t_index_list), width=size, height=size,
                        cfg_type=args.cfg_type, guidance_scale=1.0, prompt=PROMPT, seed=0)


def environment(device: torch.device) -> dict:
    return {
        "torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


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


# ------------------------------------------------------------------ several devices

#: engine.bench flags a parallel benchmark takes, by mode: dest here → its flag there
PASSED = {
    "asyncdiff": {"preset": "--model", "size": "--size", "t_index_list": "--t-index-list", "threads": "--threads",
                  "json": "--json", "frames": "--calls"},
    "replicas": {"preset": "--model", "size": "--size", "t_index_list": "--t-index-list", "threads": "--threads",
                 "json": "--json", "sessions": "--sessions", "duration": "--seconds", "warmup": "--warmup"},
}
#: engine.bench's own knobs: with several devices, those the parallel benchmark does not take are refused
OWN_FLAGS = ("frames", "rounds", "cfg_type", "skip_diffusers", "graphs", "offer_fps", "floor_calls", "sessions",
             "duration", "warmup")


def parallel_mode(args: argparse.Namespace, given: set[str]) -> str:
    """``--parallel`` resolved (the default follows ``--runtime``); ``ValueError`` naming what does not fit."""
    mode = args.parallel or ("replicas" if args.runtime else "asyncdiff")
    if mode == "asyncdiff" and args.runtime:
        raise ValueError("--runtime drives several streams and --parallel asyncdiff shards one: give --parallel "
                         "replicas, or leave --runtime out to benchmark the sharded stream")
    if args.backend not in ("auto", "torch"):
        raise ValueError(f"--backend {args.backend}: the parallel benchmarks' device processes run eager torch; "
                         f"leave --backend out with --devices")
    unused = [dest for dest in OWN_FLAGS if dest in given and dest not in PASSED[mode]]
    if unused:
        flags = ", ".join("--" + dest.replace("_", "-") for dest in unused)
        raise ValueError(f"{flags} would do nothing with --parallel {mode} on several --devices: leave "
                         f"{'them' if len(unused) > 1 else 'it'} out (the parallel benchmark's --help lists its own)")
    return mode


def parallel_argv(args: argparse.Namespace, given: set[str], mode: str, devices: tuple[str, ...]) -> list[str]:
    """The parallel benchmark's arguments: ``--devices``, and the shared flags the user gave, under its names."""
    argv = ["--devices", ",".join(devices)]
    for dest, flag in PASSED[mode].items():
        if dest in given:
            argv += [flag, str(getattr(args, dest))]
    return argv


def run_parallel(args: argparse.Namespace, given: set[str], devices: tuple[str, ...]) -> int:
    """Run the benchmark of ``--parallel`` on ``devices`` (two or more), with the flags it shares with this one."""
    from engine.parallel import bench_replicas, bench_stream

    try:
        mode = parallel_mode(args, given)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    module = {"asyncdiff": bench_stream, "replicas": bench_replicas}[mode]
    argv = parallel_argv(args, given, mode, devices)
    print(f"--parallel {mode}: python -m {module.__name__} {' '.join(argv)}", file=sys.stderr, flush=True)
    return module.main(argv)


def bench_devices(args: argparse.Namespace) -> tuple[str, ...]:
    """``--devices`` as names (empty without it); ``ValueError`` for a bad list or ``--parallel`` with one device."""
    from engine.parallel.replicas import parse_devices
    from engine.parallel.torchrun import refuse_torchrun

    refuse_torchrun("python -m engine.bench")
    devices = parse_devices(args.devices) if args.devices else ()
    if args.parallel and len(devices) < 2:
        raise ValueError(f"--parallel {args.parallel} spreads the work over several devices: give --devices with "
                         f"two or more (e.g. cpu,cpu or 0,1)")
    return devices


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    try:
        devices = bench_devices(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if len(devices) > 1:
        return run_parallel(args, given_flags(build_parser(), argv), devices)
    if devices:
        args.device = devices[0]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.runtime:
        from engine.bench_runtime import main as runtime_main

        return runtime_main(args)
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


if __name__ == "__main__":
    sys.exit(main())
