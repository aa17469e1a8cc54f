"""The diffcam application: CLI, HTTP server, WebRTC peers, sinks (built on ``engine``)."""
