"""Wire the engine, the WebRTC peers, the API and the page together, and run the server.

The page is optional (``ui=False``, ``--no-ui``): Gradio is then never imported, so the app
serves headless on machines that cannot carry Gradio's wheel.
"""

from __future__ import annotations

import argparse
import errno
import json
import secrets
import socket
import sys
from typing import TYPE_CHECKING, Any, Sequence

import uvicorn
from fastapi import FastAPI

from app.server import Attachment, Exposure, add_headless_index, binds_every_interface, create_app, parse_auth
from app.webrtc import IceServer, PeerManager, VideoOptions
from engine.backends import UNetFn
from engine.components import Components
from engine.config import StreamConfig
from engine.presets import PRESETS
from engine.runtime import Engine, EngineConfig
from engine.tokenizer_vocab import ASSETS

if TYPE_CHECKING:
    from app.virtualcam import VirtualCamera

SHUTDOWN_SECONDS = 5


def build_app(components: Components, config: StreamConfig, *, max_sessions: int = 4, idle_timeout: float = 30.0,
              unet: UNetFn | None = None, **options: Any) -> tuple[FastAPI, Engine]:
    """The whole application around already-loaded ``components`` (and ``unet``, when not torch's own);
    ``options`` as :func:`engine_app` takes them."""
    engine = Engine(EngineConfig(stream=config, max_sessions=max_sessions, idle_timeout=idle_timeout,
                                 shutdown_timeout=SHUTDOWN_SECONDS), components=components, unet=unet)
    return engine_app(engine, **options), engine


def engine_app(engine: Engine, *, auth: tuple[str, str] | None = None, video: VideoOptions = VideoOptions(),
               random_weights: bool = False, input_timeout: float = 5.0, ui: bool = True,
               start_engine: bool = True, exposure: Exposure = Exposure(), ice_servers: Sequence[IceServer] = (),
               listed: bool | None = None, attachments: Sequence[Attachment] = (),
               virtual_camera: VirtualCamera | None = None) -> FastAPI:
    """The application around ``engine`` (its lifespan starts and stops the engine unless ``start_engine`` is off).

    ``ui=False`` leaves the Gradio page out (``/`` then lists the endpoints) and never imports Gradio.
    ``exposure``: the ``Host`` names it answers to and the origins allowed cross-origin (default: loopback only);
    ``ice_servers``: STUN/TURN for the server's and the page's peer connections; ``listed``,
    ``attachments`` and ``virtual_camera``: see :func:`app.server.create_app`.
    """
    peers = PeerManager(engine, video, input_timeout, ice_servers=ice_servers)
    app = create_app(engine, peers, auth=auth, exposure=exposure, start_engine=start_engine, listed=listed,
                     attachments=attachments, virtual_camera=virtual_camera)
    if ui:
        from app.ui import mount_ui  # imported here: Gradio is heavy and absent on headless machines

        mount_ui(app, engine.config.stream, load_styles(), random_weights=random_weights,
                 listed=app.state.streams_listed)
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
            f"players at {url}/view/<stream>, health at {url}/healthz  (Ctrl+C stops)")


def announce_streams(app: FastAPI, url: str) -> None:
    """Print each stream as it starts and ends, with where to watch it (OBS's id is known only here)."""

    def started(stream_id: str, published) -> None:
        print(f"stream {stream_id} ({published.name}) started: watch {url}/view/{stream_id}  "
              f"(WHEP {url}/whep/{stream_id})", flush=True)

    def ended(stream_id: str, published) -> None:
        print(f"stream {stream_id} ({published.name}) ended", flush=True)

    app.state.hub.add_listener(started, ended)


def check_port(host: str, port: int) -> None:
    """``ValueError`` saying why and what to do, now, before the model loads, when ``host:port`` cannot be
    listened on (taken, say)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as error:
            raise ValueError(listen_error(host, port, error)) from None


def listen_error(host: str, port: int, error: OSError) -> str:
    """One line saying why ``host:port`` cannot be listened on, and what to do."""
    if error.errno in (errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", -1)):
        return (f"port {port} on {host} is already in use (another diffcam, or another server); "
                f"pick another with --port {port + 1 if port < 65535 else 7861}, or stop what is using it")
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"not allowed to listen on port {port} (ports below 1024 need root); pick another with --port 7860"
    if error.errno == errno.EADDRNOTAVAIL:
        return f"{host} is not an address of this machine; use --host 127.0.0.1, or 0.0.0.0 for every interface"
    return f"cannot listen on {host}:{port}: {error.strerror or error}"


def tls_files(args: argparse.Namespace, host: str) -> tuple[str, str] | None:
    """(certificate, key) for HTTPS, or None for plain http: ``--ssl-certfile/--ssl-keyfile``, or the
    self-signed pair ``--https`` keeps (made on first use)."""
    if args.ssl_certfile:
        return args.ssl_certfile, args.ssl_keyfile
    if not args.https:
        return None
    from app.tls import self_signed

    cert, key = self_signed(host)
    return str(cert), str(key)


def serve(args: argparse.Namespace, engine: Engine, virtual_camera: VirtualCamera | None = None,
          attachments: Sequence[Attachment] = ()) -> int:
    """Serve ``engine`` (loaded: see :meth:`Engine.load`) until Ctrl+C; the exit code (2 when it cannot
    listen or share). ``attachments`` (local sources, the virtual camera) run while it serves;
    ``virtual_camera`` gets its HTTP control."""
    auth = parse_auth(args.auth) if args.auth else None
    ui = not args.no_ui
    host = "127.0.0.1" if args.host == "localhost" else args.host
    everywhere = binds_every_interface(host)  # "", 0, ::0 as well as 0.0.0.0 and ::
    exposure = Exposure.bound_to(host, args.cors_origin or (), public=args.share)
    ice_servers = [IceServer.parse(text) for text in args.ice_server or ()]
    app = engine_app(engine, auth=auth, video=VideoOptions(args.codec, args.bitrate * 1000),
                     random_weights=args.model in PRESETS, ui=ui, exposure=exposure, ice_servers=ice_servers,
                     attachments=attachments, virtual_camera=virtual_camera)
    tls = tls_files(args, host)
    shown = "127.0.0.1" if everywhere else host
    if ":" in shown and not shown.startswith("["):  # an IPv6 address, as a URL writes it
        shown = f"[{shown}]"
    url = f"{'https' if tls else 'http'}://{shown}:{args.port}"
    announce_streams(app, url)
    print(where_to_go(url, ui), flush=True)
    if everywhere:
        print("  listening on every network interface: anyone who can reach this machine can use the camera"
              + (" page" if ui else "") + ("" if auth else " (consider --auth USER:PASS)"), file=sys.stderr)
        if ui and tls is None:
            print("  browsers give the camera only to secure pages: from another machine, start with --https",
                  file=sys.stderr)
    if args.share:
        link = open_share_link(shown, args.port)
        if link is None:
            return 2
        print(f"public link: {link}" + ("" if auth else "  (anyone with the link can use it: consider --auth)"))
    certfile, keyfile = tls or (None, None)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=SHUTDOWN_SECONDS,
                                           ssl_certfile=certfile, ssl_keyfile=keyfile))
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn shut down gracefully, then re-raised the Ctrl+C
        print("stopped")
        return 0
    except OSError as error:  # the port was taken between the check and now
        print(f"diffcam: {listen_error(host, args.port, error)}", file=sys.stderr)
        return 2
    except SystemExit:  # uvicorn exits when it cannot bind or start; it has logged why
        return 2
    return 0 if server.started else 2
