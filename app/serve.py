"""Wire the engine, the WebRTC peers, the API and the page together, and run the server."""

from __future__ import annotations

import argparse
import json
import secrets
import sys

import uvicorn
from fastapi import FastAPI

from app.server import create_app, parse_auth
from app.ui import mount_ui
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
              unet: UNetFn | None = None) -> tuple[FastAPI, Engine]:
    """The whole application around already-loaded ``components`` (and ``unet``, when not torch's own)."""
    engine = Engine(EngineConfig(stream=config, max_sessions=max_sessions, idle_timeout=idle_timeout,
                                 shutdown_timeout=SHUTDOWN_SECONDS), components=components, unet=unet)
    peers = PeerManager(engine, video, input_timeout)
    app = create_app(engine, peers, auth=auth)
    mount_ui(app, config, load_styles(), random_weights=random_weights)
    return app, engine


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


def serve(args: argparse.Namespace, components: Components, config: StreamConfig, unet: UNetFn | None = None) -> int:
    auth = parse_auth(args.auth) if args.auth else None
    app, _ = build_app(components, config, max_sessions=args.max_sessions, idle_timeout=args.idle_timeout,
                       auth=auth, video=VideoOptions(args.codec, args.bitrate * 1000),
                       random_weights=args.model in PRESETS, unet=unet)
    host = "127.0.0.1" if args.host == "localhost" else args.host
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    print(f"open http://{shown}:{args.port}  (Ctrl+C stops)", flush=True)
    if host in ("0.0.0.0", "::"):
        print("  listening on every network interface: anyone who can reach this machine can use the camera page"
              + ("" if auth else " (consider --auth USER:PASS)"), file=sys.stderr)
    if args.share:
        link = open_share_link(host, args.port)
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
