"""Frames in and out of the model: any size in, the configured size out.

Accepted frames: ``uint8`` numpy arrays ``H×W×3`` (RGB), torch tensors ``3×H×W`` /
``1×3×H×W`` (float in [0, 1], or uint8), or decoded video frames with
``to_ndarray(format="rgb24")`` (PyAV's ``VideoFrame``), converted only when a worker takes
them, so frames dropped for newer ones never pay for colour conversion. Size policy: centre-crop to the target aspect ratio,
then resize to exactly ``width×height`` (bilinear, antialiased when shrinking). Outputs come
back in the kind that came in: a uint8 ``H×W×3`` array for an array, a float ``3×H×W`` tensor
in [0, 1] for a tensor.
"""

from __future__ import annotations

from typing import Literal, Union

import numpy as np
import torch
import torch.nn.functional as F

Frame = Union[np.ndarray, torch.Tensor]
FrameKind = Literal["np", "pt"]


def frame_kind(frame: Frame) -> FrameKind:
    if isinstance(frame, np.ndarray) or _is_video_frame(frame):
        return "np"
    if isinstance(frame, torch.Tensor):
        return "pt"
    raise ValueError(f"a frame must be a numpy array or a torch tensor, got {type(frame).__name__}")


MAX_FRAME_SIDE = 8192


def to_chw(frame: Frame, device: torch.device) -> torch.Tensor:
    """One frame as a ``3×H×W`` tensor on ``device``, still uint8 when it came as uint8 (cheap to crop)."""
    if frame_kind(frame) == "np":
        array = frame.to_ndarray(format="rgb24") if _is_video_frame(frame) else np.asarray(frame)
        if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
            raise ValueError(f"a numpy frame must be uint8 H×W×3 RGB, got {array.dtype} {array.shape}")
        _check_size(array.shape[0], array.shape[1])
        return torch.from_numpy(np.ascontiguousarray(array)).to(device).permute(2, 0, 1)
    tensor = frame.squeeze(0) if frame.ndim == 4 and frame.shape[0] == 1 else frame
    if tensor.ndim != 3 or tensor.shape[0] != 3:
        raise ValueError(f"a tensor frame must be 3×H×W or 1×3×H×W, got {tuple(frame.shape)}")
    _check_size(tensor.shape[1], tensor.shape[2])
    if tensor.dtype != torch.uint8 and not tensor.is_floating_point():
        raise ValueError(f"a tensor frame must be float in [0, 1] or uint8, got {tensor.dtype}")
    return tensor.to(device)


def to_unit(image: torch.Tensor) -> torch.Tensor:
    """uint8 → float32 in [0, 1]; floats → float32."""
    return image.float().div_(255.0) if image.dtype == torch.uint8 else image.to(torch.float32)


def fit(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Centre-crop ``3×H×W`` to the aspect ratio of ``height×width``, then resize to it (float32 in [0, 1])."""
    _, h, w = image.shape
    crop_h, crop_w = (h, round(h * width / height)) if w * height > h * width else (round(w * height / width), w)
    crop_h, crop_w = max(1, min(crop_h, h)), max(1, min(crop_w, w))
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    image = to_unit(image[:, top:top + crop_h, left:left + crop_w])
    if (crop_h, crop_w) == (height, width):
        return image
    shrinking = crop_h > height or crop_w > width
    return F.interpolate(image[None], size=(height, width), mode="bilinear", align_corners=False,
                         antialias=shrinking)[0]


def preprocess(frames: list[Frame], height: int, width: int, device: torch.device,
               dtype: torch.dtype) -> torch.Tensor:
    """Frames → one ``f×3×height×width`` batch in [-1, 1], the VAE's input range."""
    batch = torch.stack([fit(to_chw(frame, device), height, width) for frame in frames])
    return batch.mul_(2.0).sub_(1.0).to(dtype)


def postprocess(images: torch.Tensor, kind: FrameKind) -> list[Frame]:
    """A decoded ``f×3×H×W`` batch in [-1, 1] → frames of ``kind``."""
    unit = images.float().add(1.0).div_(2.0).clamp_(0.0, 1.0)
    if kind == "pt":
        return list(unit.unbind(0))
    as_uint8 = unit.mul_(255.0).round_().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return list(as_uint8)


def _is_video_frame(frame: object) -> bool:
    return callable(getattr(frame, "to_ndarray", None)) and not isinstance(frame, (np.ndarray, torch.Tensor))


def _check_size(height: int, width: int) -> None:
    if height < 1 or width < 1:
        raise ValueError(f"a frame must have at least one pixel, got {height}×{width}")
    if height > MAX_FRAME_SIDE or width > MAX_FRAME_SIDE:
        raise ValueError(f"a frame of {height}×{width} is too large; at most {MAX_FRAME_SIDE} pixels a side")


class PixelLoader:
    """Frames into rows of a fixed ``(N, 3, H, W)`` float32 buffer on the device, fitted to ``H×W``.

    On a GPU, uint8 arrays and decoded video frames already at the target size (the common case
    once a source sends the stream's size) are packed into one pinned host buffer and cross in one
    asynchronous copy;
    other frames are fitted on the device one by one. Tensors already fitted (a similarity
    check made them) are copied as they are.
    """

    def __init__(self, target: torch.Tensor, *, stage: bool | None = None) -> None:
        """``stage``: pack exact-size arrays into one host buffer (default: on CUDA, pinned; tests force it on the CPU)."""
        self.target = target
        self.device = target.device
        capacity, _, self.height, self.width = target.shape
        cuda = self.device.type == "cuda"
        stage = cuda if stage is None else stage
        self._staging = torch.empty(capacity, self.height, self.width, 3, dtype=torch.uint8, pin_memory=cuda) \
            if stage else None
        self._landing = torch.empty(capacity, self.height, self.width, 3, dtype=torch.uint8, device=self.device) \
            if stage else None

    def load(self, frames: list[Frame | torch.Tensor]) -> torch.Tensor:
        """Write ``frames`` into the first rows; returns those rows."""
        staged = []
        for row, frame in enumerate(frames):
            if self._staging is not None and _is_video_frame(frame) \
                    and (frame.height, frame.width) == (self.height, self.width):  # type: ignore[union-attr]
                frame = frame.to_ndarray(format="rgb24")  # type: ignore[union-attr] # a WebRTC frame: staged too
            if self._staging is not None and self._stageable(frame):
                self._staging[row].numpy()[...] = frame
                staged.append(row)
            else:
                self.target[row].copy_(self.fitted(frame))
        if staged:
            self._cross(staged)
        return self.target[: len(frames)]

    def fitted(self, frame: Frame | torch.Tensor) -> torch.Tensor:
        """One frame as ``3×H×W`` float32 in [0, 1] on the device (a fitted tensor is returned as is)."""
        if isinstance(frame, torch.Tensor) and frame.dtype == torch.float32 and frame.device == self.device \
                and tuple(frame.shape) == (3, self.height, self.width):
            return frame
        return fit(to_chw(frame, self.device), self.height, self.width)

    def _stageable(self, frame: object) -> bool:
        return isinstance(frame, np.ndarray) and frame.dtype == np.uint8 \
            and frame.shape == (self.height, self.width, 3)

    def _cross(self, rows: list[int]) -> None:
        """Staged rows to the device in one copy (contiguous span), then to float in [0, 1]."""
        assert self._staging is not None and self._landing is not None
        low, high = min(rows), max(rows) + 1
        self._landing[low:high].copy_(self._staging[low:high], non_blocking=True)
        if rows == list(range(low, high)):  # the usual case: one kernel for all
            torch.div(self._landing[low:high].permute(0, 3, 1, 2), 255.0, out=self.target[low:high])
            return
        for row in rows:
            torch.div(self._landing[row].permute(2, 0, 1), 255.0, out=self.target[row])
