"""``python app/main.py`` (or ``diffcam``): serve the live stylizer page on http://127.0.0.1:7860."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python app/main.py`: import the project, not app/ siblings
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home from a camera app

from engine.config import CFG_TYPES, StreamConfig, parse_t_index_list, strength_to_t_index_list  # noqa: E402
from engine.cli import HelpFormatter, add_backend_argument, add_model_arguments, model_spec  # noqa: E402
from app.local import LocalError, add_local_arguments, plan_local  # noqa: E402


class StartupError(RuntimeError):
    """A problem that stops the server from starting; printed as one line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffcam", description="Live webcam stylizer: your camera, Stable Diffusion img2img, back in real time.",
        formatter_class=HelpFormatter)
    model = parser.add_argument_group("model")
    add_model_arguments(model)
    add_backend_argument(model)
    model.add_argument("--trt", action="store_true", help="the same as --backend trt (NVIDIA GPUs)")
    model.add_argument("--devices", default=None, metavar="LIST",
                       help="serve on several devices, one process each, sessions spread over them: 0,1 (CUDA "
                            "indices), cuda:0,cuda:1, or cpu,cpu (default: the one --device)")
    model.add_argument("--parallel", default="replicas", choices=["replicas", "asyncdiff"],
                       help="how several --devices share the work: replicas (each device holds the whole model "
                            "and serves its own sessions: more streams) or asyncdiff (one stream at a time, its "
                            "UNet split over the devices, AsyncDiff-style: a faster stream)")
    model.add_argument("--resync-every", type=int, default=None, metavar="N",
                       help="--parallel asyncdiff: run every N-th call synchronously, so stale activations never "
                            "build up (default: only at the start and after a change)")
    model.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=None,
                       help="replay each call as a CUDA graph (default: on NVIDIA GPUs; --no-graphs runs eagerly)")
    stream = parser.add_argument_group("stream (the page can change the live ones)")
    stream.add_argument("--prompt", default="a watercolor painting, soft washes of colour, paper texture",
                        help="what the camera should become")
    stream.add_argument("--negative-prompt", default="photo, blurry, low quality", help="what to steer away from")
    stream.add_argument("--width", type=int, default=None, help="output width (default: 512; a preset's own size)")
    stream.add_argument("--height", type=int, default=None, help="output height (default: 512; a preset's own size)")
    steps = stream.add_mutually_exclusive_group()
    steps.add_argument("--strength", type=float, default=None, help="0 keeps the camera image, 1 re-imagines it")
    steps.add_argument("--t-index-list", default="32,45", help="denoising steps out of --num-inference-steps")
    stream.add_argument("--steps", type=int, default=2, help="denoising steps when --strength is given")
    stream.add_argument("--num-inference-steps", type=int, default=50, help="length of the LCM schedule")
    stream.add_argument("--cfg-type", default="self", choices=CFG_TYPES, help="residual CFG variant")
    stream.add_argument("--guidance", type=float, default=1.2, help="guidance scale")
    stream.add_argument("--delta", type=float, default=1.0, help="RCFG stock-noise multiplier")
    stream.add_argument("--seed", type=int, default=2, help="seed of the stream's fixed noise")
    stream.add_argument("--similarity-filter", action="store_true", help="skip near-duplicate camera frames")
    stream.add_argument("--similarity-threshold", type=float, default=0.98, help="cosine similarity above which frames may be skipped")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 exposes it to your network)")
    server.add_argument("--port", type=int, default=7860, help="port to listen on")
    server.add_argument("--max-sessions", type=int, default=4, help="concurrent camera streams; more get 'busy'")
    server.add_argument("--idle-timeout", type=float, default=30.0, help="seconds before an abandoned stream is freed")
    server.add_argument("--hang-timeout", type=float, default=None, metavar="SECONDS",
                        help="a round on a device running this long means it hangs: /healthz answers 503 and new "
                             "streams are refused, a replica on it exits (default: 300 on GPUs, off on the CPU; "
                             "with --parallel asyncdiff, how long one call may take: 120 by default)")
    server.add_argument("--share", action="store_true",
                        help="also open a public link through Gradio's share servers (needs internet)")
    server.add_argument("--no-ui", action="store_true",
                        help="serve without the Gradio page: signalling (/offer), WHIP/WHEP, /healthz and /metrics "
                             "only (headless and OBS use)")
    server.add_argument("--auth", default=None, metavar="USER:PASS", help="protect the page and /offer")
    server.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN",
                        help="a web origin (https://host[:port]) whose pages may call /whip and /whep; "
                             "repeat for more, * for any (default: none)")
    server.add_argument("--https", action="store_true",
                        help="serve over HTTPS with a self-signed certificate made on first use and kept in "
                             "~/.cache/diffcam/tls (browsers give the camera only to secure pages: needed to use "
                             "the page from another machine)")
    server.add_argument("--ssl-certfile", default=None, metavar="FILE",
                        help="serve over HTTPS with this certificate (PEM) instead of a self-signed one")
    server.add_argument("--ssl-keyfile", default=None, metavar="FILE",
                        help="the private key of --ssl-certfile (PEM), unless the certificate file holds it")
    server.add_argument("--ice-server", action="append", default=None, metavar="URL[,USER,CREDENTIAL]",
                        help="a STUN or TURN server for peers behind NAT, given to the server and the page "
                             "(e.g. stun:stun.l.google.com:19302 or turn:turn.example.com:3478,user,secret); "
                             "repeat for more (default: none, host addresses only)")
    server.add_argument("--codec", default="vp8", choices=["vp8", "h264"], help="preferred video codec back")
    server.add_argument("--bitrate", type=int, default=3000, help="video bitrate back to the browser, kbit/s")
    add_local_arguments(parser)
    return parser


def stream_config(args: argparse.Namespace) -> StreamConfig:
    from engine.presets import PRESETS

    default_size = PRESETS[args.model].default_size if args.model in PRESETS else 512
    if args.strength is not None:
        t_index_list = strength_to_t_index_list(args.strength, args.steps, args.num_inference_steps)
    else:
        t_index_list = parse_t_index_list(args.t_index_list)
    return StreamConfig(
        t_index_list=t_index_list, num_inference_steps=args.num_inference_steps,
        width=args.width or default_size, height=args.height or default_size, cfg_type=args.cfg_type,
        guidance_scale=args.guidance, delta=args.delta, seed=args.seed, prompt=args.prompt,
        negative_prompt=args.negative_prompt, similarity_filter=args.similarity_filter,
        similarity_threshold=args.similarity_threshold,
    )


def check_server_args(args: argparse.Namespace) -> None:
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} is out of range; allowed: [1, 65535]")
    if not 100 <= args.bitrate <= 50_000:
        raise ValueError(f"--bitrate {args.bitrate} kbit/s is out of range; allowed: [100, 50000]")
    if args.share and args.no_ui:
        raise ValueError("--share opens a link to the Gradio page, which --no-ui turns off; use one or the other")
    from app.server import check_origin, parse_auth

    if args.auth is not None:
        parse_auth(args.auth)
    for origin in args.cors_origin or ():
        check_origin(origin)
    from app.webrtc import IceServer

    for text in args.ice_server or ():
        IceServer.parse(text)
    if args.ssl_keyfile and not args.ssl_certfile:
        raise ValueError("--ssl-keyfile needs --ssl-certfile (the certificate it belongs to)")
    for flag, path in (("--ssl-certfile", args.ssl_certfile), ("--ssl-keyfile", args.ssl_keyfile)):
        if path and not Path(path).is_file():
            raise ValueError(f"{flag} {path}: no such file")


def backend_name(args: argparse.Namespace) -> str:
    return "trt" if args.trt else args.backend


def devices(args: argparse.Namespace) -> tuple[str, ...]:
    """``--devices`` as device names (empty: the one ``--device``); ``ValueError`` saying what is wrong."""
    from engine.parallel.replicas import parse_devices

    return parse_devices(args.devices) if args.devices else ()


def check_backend(args: argparse.Namespace) -> None:
    """Say what the chosen devices and backend lack before loading anything (GPUs, TensorRT, CUDA, a compiler)."""
    from dataclasses import replace

    from engine.backends import backend_missing

    spec = model_spec(args)
    if args.devices:
        from engine.parallel.replicas import check_present

        check_present(devices(args))
        spec = replace(spec, device=devices(args)[0])
    missing = backend_missing(backend_name(args), spec.resolved_device())
    if missing is not None:
        flag = "--trt" if args.trt else f"--backend {args.backend}"
        raise StartupError(f"{flag} needs {missing}")


def build_engine(args: argparse.Namespace, config: StreamConfig):
    """The engine the flags describe; nothing is loaded yet (see :func:`load`)."""
    from app.serve import SHUTDOWN_SECONDS
    from engine.runtime import Engine, EngineConfig

    names = devices(args)
    engine_config = EngineConfig(model=model_spec(args), stream=config, backend=backend_name(args), graphs=args.graphs,
                                 max_sessions=args.max_sessions, idle_timeout=args.idle_timeout,
                                 hang_timeout=args.hang_timeout, shutdown_timeout=SHUTDOWN_SECONDS, devices=names)
    if args.resync_every is not None and (len(names) < 2 or args.parallel != "asyncdiff"):
        raise ValueError("--resync-every applies to --parallel asyncdiff with several --devices")
    if len(names) > 1 and args.parallel == "asyncdiff":  # one stream, its UNet split: one process per device
        from engine.parallel.sharded_engine import ShardedEngine

        if len(args.source or ()) > 1:
            raise ValueError(f"--parallel asyncdiff serves one stream at a time; {len(args.source)} --source "
                             "given: keep one, or use --parallel replicas")
        if args.resync_every is not None and args.resync_every < 1:
            raise ValueError(f"--resync-every {args.resync_every} must be at least 1")
        return ShardedEngine(engine_config, resync_every=args.resync_every)
    if len(names) > 1:  # --parallel replicas: one process per device
        from engine.parallel.replicas import ReplicaEngine

        return ReplicaEngine(engine_config)
    return Engine(engine_config)


def load(engine, args: argparse.Namespace) -> None:
    """Load, compile or build, and capture on the device's worker, with a progress bar; StartupError if it fails."""
    from tqdm import tqdm

    from engine.models import LOAD_STAGES, ModelUnavailableError
    from engine.quiet import quiet_libraries

    quiet_libraries()
    with tqdm(total=len(LOAD_STAGES), desc=f"loading {args.model}", unit="stage", file=sys.stderr) as bar:
        def progress(stage: str) -> None:
            if stage in LOAD_STAGES:
                bar.set_postfix_str(stage)
                bar.update()
            else:  # compiling, building engines, capturing graphs: say what takes the time
                bar.write(f"  {stage}", file=sys.stderr)

        try:
            engine.load(progress)
        except ModelUnavailableError:
            raise
        except (RuntimeError, OSError) as error:  # a backend that cannot run, a failed engine build, a full disk
            raise StartupError(f"backend {backend_name(args)}: {error}") from error


def describe(engine, config: StreamConfig, args: argparse.Namespace) -> str:
    from engine.presets import PRESETS

    components = engine.components
    weights = " (random weights: the pictures are abstract)" if args.model in PRESETS else ""
    return (f"model {components.name}{weights}\n"
            f"  {components.device} {str(components.dtype).replace('torch.', '')}, backend {engine.backend}, "
            f"{config.width}x{config.height}, t_index_list={list(config.t_index_list)} "
            f"({config.denoising_steps} steps), cfg {config.cfg_type}, up to {engine.config.max_sessions} streams")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # before anything heavy loads: --help and bad flags answer at once
    from engine.models import ModelUnavailableError
    from engine.parallel.torchrun import refuse_torchrun

    plan = None
    try:
        refuse_torchrun("python app/main.py")
        config = stream_config(args)
        check_server_args(args)
        from app.serve import check_port

        check_port(args.host, args.port)
        check_backend(args)
        plan = plan_local(args, (config.width, config.height))  # cameras, files, the virtual camera: before loading
        engine = build_engine(args, config)
        load(engine, args)
    except (ValueError, StartupError, ModelUnavailableError, LocalError) as error:
        if plan is not None:
            plan.close()
        print(f"diffcam: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl+C while loading or compiling: the workers are daemon threads
        if plan is not None:
            plan.close()
        print("stopped", file=sys.stderr)
        return 130
    print(describe(engine, config, args))
    from app.local import attach_local
    from app.serve import serve

    try:
        return serve(args, engine, plan.virtual_camera, attachments=[attach_local(plan, engine)])
    finally:
        plan.close()  # what serving never attached (it could not listen, say)


if __name__ == "__main__":
    sys.exit(main())
