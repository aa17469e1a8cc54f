"""Wire the engine, the WebRTC peers, the API and the page together, and run the server.

The page is optional (``ui=False``, ``--no-ui``): Gradio is then never imported, so the app
serves headless on machines that cannot carry Gradio's wheel.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys

import uvicorn
from fastapi import FastAPI

from app.server import Exposure, add_headless_index, binds_every_interface, create_app, parse_auth
from app.webrtc import PeerManager, VideoOptions
from engine.backends import UNetFn
from engine.components import Components
from engine.config import StreamConfig
from engine.presets import PRESETS
from engine.runtime import Engine, EngineConfig
from engine.tokenizer_vocab import ASSETS

SHUTDOWN_SECONDS = 5


def build_app(components: Components, config: StreamConfig, *, max_sessions: int = 4, idle_timeout: float = 30.0,
              auth: tuple[str, str] | None = None, video: VideoOptions = VideoOptions(),
              random_weights: bool = False, input_timeout: float = 5.0,
              unet: UNetFn | None = None, ui: bool = True) -> tuple[FastAPI, Engine]:
    """The whole application around already-loaded ``components`` (and ``unet``, when not torch's own).

    ``ui=False`` leaves the Gradio page out (``/`` then lists the endpoints) and never imports Gradio.
    """
    engine = Engine(EngineConfig(stream=config, max_sessions=max_sessions, idle_timeout=idle_timeout,
                                 shutdown_timeout=SHUTDOWN_SECONDS), components=components, unet=unet)
    return engine_app(engine, auth=auth, video=video, random_weights=random_weights, input_timeout=input_timeout,
                      ui=ui), engine


def engine_app(engine: Engine, *, auth: tuple[str, str] | None = None, video: VideoOptions = VideoOptions(),
               random_weights: bool = False, input_timeout: float = 5.0, ui: bool = True,
               start_engine: bool = True, exposure: Exposure = Exposure()) -> FastAPI:
    """The application around ``engine`` (its lifespan starts and stops the engine unless ``start_engine`` is off).

    ``exposure``: the ``Host`` names it answers to and the origins allowed cross-origin (default: loopback only).
    """
    peers = PeerManager(engine, video, input_timeout)
    app = create_app(engine, peers, auth=auth, exposure=exposure, start_engine=start_engine)
    if ui:
        from app.ui import mount_ui  # imported here: Gradio is heavy and absent on headless machines

        mount_ui(app, engine.config.stream, load_styles(), random_weights=random_weights)
    else:
        add_headless_index(app)
    return app


def load_styles() -> list[dict]:
    """The style presets shipped in ``assets/styles.json``."""
    return json.loads((ASSETS / "styles.json").read_text("utf-8"))


def open_share_link(host: str, port: int) -> str | None:
    """A public https link through Gradio's share servers (needs internet); None with a message if not."""
    from gradio.networking import setup_tunnel

    local = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    try:
        return setup_tunnel(local, port, secrets.token_urlsafe(32), None, None)
    except Exception as error:  # noqa: BLE001 - any failure means no link: say so and stop
        print(f"diffcam: --share could not open a public link ({type(error).__name__}: {error}); it needs "
              "internet access to Gradio's share servers. Without it, use --host 0.0.0.0 on your network.",
              file=sys.stderr)
        return None


def where_to_go(url: str, ui: bool) -> str:
    """The line that tells the user what to open: the page, or (``--no-ui``) the endpoints to stream to."""
    if ui:
        return f"open {url}  (Ctrl+C stops)"
    return (f"serving {url} without a page (--no-ui): WebRTC offers to {url}/offer, OBS (WHIP) to {url}/whip, "
            f"health at {url}/healthz  (Ctrl+C stops)")


def serve(args: argparse.Namespace, engine: Engine) -> int:
    """Serve ``engine`` (loaded: see :meth:`Engine.load`) until Ctrl+C; the exit code (2 when it cannot listen or share)."""
    auth = parse_auth(args.auth) if args.auth else None
    ui = not args.no_ui
    host = "127.0.0.1" if args.host == "localhost" else args.host
    everywhere = binds_every_interface(host)  # "", 0, ::0 as well as 0.0.0.0 and ::
    exposure = Exposure.bound_to(host, args.cors_origin or (), public=args.share)
    app = engine_app(engine, auth=auth, video=VideoOptions(args.codec, args.bitrate * 1000),
                     random_weights=args.model in PRESETS, ui=ui, exposure=exposure)
    shown = "127.0.0.1" if everywhere else host
    print(where_to_go(f"http://{shown}:{args.port}", ui), flush=True)
    if everywhere:
        print("  listening on every network interface: anyone who can reach this machine can use the camera"
              + (" page" if ui else "") + ("" if auth else " (consider --auth USER:PASS)"), file=sys.stderr)
    if args.share:
        link = open_share_link(shown, args.port)
        if link is None:
            return 2
        print(f"public link: {link}" + ("" if auth else "  (anyone with the link can use it: consider --auth)"))
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=SHUTDOWN_SECONDS))
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn shut down gracefully, then re-raised the Ctrl+C
        print("stopped")
        return 0
    except OSError as error:  # e.g. the port is taken
        print(f"diffcam: cannot listen on {host}:{args.port}: {error.strerror or error}", file=sys.stderr)
        return 2
    return 0 if server.started else 2
