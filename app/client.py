"""A headless diffcam client (aiortc): sends a camera track to ``/offer``, collects the stylized frames.

Used by the tests and the app benchmark; it is also the shape of any headless use (a
recorder, a relay): anything that can make a WebRTC offer can use diffcam.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json

import av
import httpx
import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription, VideoStreamTrack
from aiortc.mediastreams import MediaStreamError

VIDEO_CLOCK = fractions.Fraction(1, 90000)
SENT_HISTORY = 10_000  # frames whose send time is remembered


class SyntheticCamera(VideoStreamTrack):
    """Plays ``frames`` (uint8 RGB) in a loop at ``fps`` on a fixed schedule, remembering when each pts left."""

    def __init__(self, frames: list[np.ndarray], fps: float = 30.0) -> None:
        super().__init__()
        self.frames, self.fps, self.index = frames, fps, 0
        self.sent_at: dict[int, float] = {}
        self._start: float | None = None

    def sent_index_at(self, index: int) -> float | None:
        """When frame ``index`` left the camera (None if it never did)."""
        return self.sent_at.get(round(index * 90000 / self.fps))

    def picture(self, index: int) -> np.ndarray:
        return self.frames[index % len(self.frames)]

    async def recv(self) -> av.VideoFrame:
        loop = asyncio.get_running_loop()
        if self._start is None:
            self._start = loop.time()
        due = self._start + self.index / self.fps
        await asyncio.sleep(max(0.0, due - loop.time()))
        frame = av.VideoFrame.from_ndarray(self.picture(self.index), format="rgb24")
        frame.pts, frame.time_base = round(self.index * 90000 / self.fps), VIDEO_CLOCK
        self.sent_at[frame.pts] = loop.time()
        self.sent_at.pop(round((self.index - SENT_HISTORY) * 90000 / self.fps), None)  # bounded memory
        self.index += 1
        return frame


class Client:
    """One browser-like peer: sends the camera, collects what comes back, talks on ``control``."""

    def __init__(self, camera: SyntheticCamera) -> None:
        self.pc = RTCPeerConnection()
        self.pc.addTrack(camera)
        self.channel = self.pc.createDataChannel("control")
        self.camera = camera
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


BITS = 16


class BarcodeCamera(SyntheticCamera):
    """Stamps each frame's index as a row of black/white cells across the top (see :func:`read_barcode`).

    Through a model that keeps the picture (the ``null`` model) the index comes back, which
    gives exact glass-to-glass latency: arrival time minus when that index left the camera.
    """

    def picture(self, index: int) -> np.ndarray:
        frame = self.frames[index % len(self.frames)].copy()
        cell = frame.shape[1] // BITS
        for bit in range(BITS):
            frame[:cell, bit * cell:(bit + 1) * cell] = 255 if (index >> bit) & 1 else 0
        return frame


def read_barcode(frame: np.ndarray) -> int:
    cell = frame.shape[1] // BITS
    centre = frame[cell // 2, cell // 2::cell][:BITS].mean(axis=-1)
    return int(sum(1 << bit for bit, value in enumerate(centre) if value > 127))


async def run(url: str, fps: float, size: int, warmup: float, seconds: float, barcode: bool) -> dict:
    """Stream a synthetic camera to ``url`` and report what came back in the measured window."""
    from engine.synthetic import moving_frames

    camera = (BarcodeCamera if barcode else SyntheticCamera)(moving_frames(30, size, size), fps)
    client = Client(camera)
    try:
        response = await client.connect(url)
        if response.status_code != 200:
            return {"error": f"{response.status_code}: {response.text}"}
        await asyncio.sleep(warmup)
        first = len(client.frames)
        await asyncio.sleep(seconds)
        received, arrivals = client.frames[first:], client.arrivals[first:]
    finally:
        await client.close()
    result: dict = {"frames": len(received), "fps": len(received) / seconds}
    if barcode:
        sent = [camera.sent_index_at(read_barcode(frame)) for frame in received]
        result["latencies"] = [a - s for a, s in zip(arrivals, sent) if s is not None and a >= s]
    return result


def main(argv: list[str] | None = None) -> int:
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="python -m app.client",
                                     description="Stream a synthetic camera to a diffcam server; report fps.")
    parser.add_argument("--url", default="http://127.0.0.1:7860", help="the diffcam server")
    parser.add_argument("--fps", type=float, default=30.0, help="frames/s the camera offers")
    parser.add_argument("--size", type=int, default=512, help="square camera frame size")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds measured")
    parser.add_argument("--barcode", action="store_true", help="stamp frame indices to measure latency")
    parser.add_argument("--json", default=None, help="write the result here")
    args = parser.parse_args(argv)
    result = asyncio.run(run(args.url, args.fps, args.size, args.warmup, args.seconds, args.barcode))
    if args.json:
        Path(args.json).write_text(json.dumps(result))
    print(f"{result.get('fps', 0):.1f} frames/s back" if "error" not in result else result["error"])
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    raise SystemExit(main())
