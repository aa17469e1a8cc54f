"""Synthetic moving pictures for benchmarks, demos and tests: no camera, no files needed."""

from __future__ import annotations

import numpy as np


def moving_frame(index: int, height: int, width: int) -> np.ndarray:
    """Frame ``index`` of a smooth colour field with a bright disc orbiting the centre (uint8 RGB)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = index * 0.15
    red = 0.5 + 0.5 * np.sin(xs / width * 6.28 + phase)
    green = 0.5 + 0.5 * np.sin(ys / height * 6.28 - phase * 0.7)
    blue = 0.5 + 0.5 * np.cos((xs + ys) / (width + height) * 6.28 + phase * 0.5)
    picture = np.stack([red, green, blue], axis=-1)
    cy = height / 2 + height / 4 * np.sin(phase)
    cx = width / 2 + width / 4 * np.cos(phase)
    disc = ((ys - cy) ** 2 + (xs - cx) ** 2) < (min(height, width) / 8) ** 2
    picture[disc] = 1.0
    return (picture * 255).astype(np.uint8)


def moving_frames(count: int, height: int, width: int) -> list[np.ndarray]:
    return [moving_frame(i, height, width) for i in range(count)]


def write_y4m(path: str, frames: int = 30, height: int = 120, width: int = 160, fps: int = 15) -> None:
    """Write the moving clip as a 4:2:0 Y4M file (Chromium's fake camera reads these; it loops them)."""
    import cv2

    with open(path, "wb") as out:
        out.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420\n".encode())
        for index in range(frames):
            i420 = cv2.cvtColor(moving_frame(index * 2, height, width), cv2.COLOR_RGB2YUV_I420)
            out.write(b"FRAME\n" + i420.tobytes())


if __name__ == "__main__":
    import sys

    target = sys.argv[1] if len(sys.argv) > 1 else "assets/camera.y4m"
    write_y4m(target)
    print(f"wrote {target}")
