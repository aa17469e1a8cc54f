"""A real aiortc client for tests and benchmarks: a synthetic camera in, stylized frames out."""

from __future__ import annotations

import asyncio
import contextlib
import json

import av
import httpx
import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription, VideoStreamTrack
from aiortc.mediastreams import MediaStreamError


class SyntheticCamera(VideoStreamTrack):
    """Plays ``frames`` (uint8 RGB) in a loop at 30 fps with proper timestamps."""

    def __init__(self, frames: list[np.ndarray]) -> None:
        super().__init__()
        self.frames, self.index = frames, 0

    async def recv(self) -> av.VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = av.VideoFrame.from_ndarray(self.frames[self.index % len(self.frames)], format="rgb24")
        frame.pts, frame.time_base = pts, time_base
        self.index += 1
        return frame


class Client:
    """One browser-like peer: sends the camera, collects what comes back, talks on ``control``."""

    def __init__(self, camera: SyntheticCamera) -> None:
        self.pc = RTCPeerConnection()
        self.pc.addTrack(camera)
        self.channel = self.pc.createDataChannel("control")
        self.frames: list[np.ndarray] = []
        self.arrivals: list[float] = []
        self.messages: list[dict] = []
        self.opened = asyncio.Event()
        self._reader: asyncio.Task | None = None
        self.channel.on("open", self.opened.set)
        self.channel.on("message", lambda m: self.messages.append(json.loads(m)))
        self.pc.on("track", self._on_track)

    def _on_track(self, track) -> None:
        self._reader = asyncio.create_task(self._read(track))

    async def _read(self, track) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                self.frames.append(frame.to_ndarray(format="rgb24"))
                self.arrivals.append(loop.time())

    async def connect(self, base_url: str, auth: tuple[str, str] | None = None) -> httpx.Response:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        offer = {"sdp": self.pc.localDescription.sdp, "type": self.pc.localDescription.type}
        async with httpx.AsyncClient(base_url=base_url, auth=auth, timeout=20) as http:
            response = await http.post("/offer", json=offer)
        if response.status_code == 200:
            answer = response.json()
            await self.pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
        return response

    async def wait_frames(self, count: int, timeout: float = 30.0) -> list[np.ndarray]:
        """Wait until ``count`` more frames have arrived; returns them."""
        start = len(self.frames)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.frames) < start + count:
            if loop.time() > deadline:
                raise AssertionError(f"only {len(self.frames) - start} of {count} frames in {timeout} s")
            await asyncio.sleep(0.02)
        return self.frames[start:start + count]

    async def send(self, params: dict, timeout: float = 10.0) -> dict:
        """Send a control message; returns the server's reply (applied or error)."""
        await asyncio.wait_for(self.opened.wait(), timeout)
        seen = len(self.messages)
        self.channel.send(json.dumps(params))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            replies = [m for m in self.messages[seen:] if m.get("type") in ("applied", "error")]
            if replies:
                return replies[0]
            if loop.time() > deadline:
                raise AssertionError("no reply to the control message")
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        await self.pc.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
