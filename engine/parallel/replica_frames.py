"""Frames between the front process and a replica process: shared-memory slots, not pickles.

Each session owns two blocks (``multiprocessing.shared_memory``), made and unlinked by the
front: an input block and an output block of :data:`SLOTS` frames each, every frame RGB
uint8 at the model's ``height×width``. Only the slot index crosses the pipe.

A slot has one owner at a time, handed over by the pipe messages (which are ordered):
the writer owns a slot until it sends "filled slot k"; the reader owns it from receiving
that message until it has copied the frame out and sent "slot k is free". The writer only
writes into slots it owns, so a frame is never overwritten while it is being read. With two
slots the writer can fill one while the other is in transit; when both are in transit the
newest frame waits in the writer's one-frame mailbox (newest wins), so nothing queues.

A block's memory is taken when it is made, not when a frame is first written: on Linux shared
memory lives in ``/dev/shm``, a tmpfs (64 MB in a Docker container unless ``--shm-size`` says
more), and writing into a block that tmpfs has no room for kills the whole server with SIGBUS.
A session it has no room for is refused instead, with :class:`~engine.session.EngineBusyError`.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import numpy as np
import torch
from multiprocessing import shared_memory

from engine.image import Frame, fit, to_chw
from engine.session import EngineBusyError

log = logging.getLogger(__name__)

SLOTS = 2  # one in transit while the next is written

PREFIX = "diffcam-replica-"  # every block's name starts so (tests look for leftovers in /dev/shm)
SHM = Path("/dev/shm")  # where Linux keeps POSIX shared memory


class FrameSlots:
    """``SLOTS`` frames of ``height×width×3`` uint8 in one shared-memory block."""

    def __init__(self, block: shared_memory.SharedMemory, height: int, width: int, owner: bool) -> None:
        self._block = block
        self.shape = (height, width, 3)
        self.owner = owner
        self._open = True

    @classmethod
    def create(cls, name: str, height: int, width: int) -> "FrameSlots":
        """A new block named ``PREFIX + name`` (the creator unlinks it on :meth:`release`), its memory taken
        now; ``EngineBusyError`` when shared memory has no room for it."""
        size = SLOTS * height * width * 3
        try:
            block = shared_memory.SharedMemory(name=PREFIX + name, create=True, size=size)
        except OSError as error:  # out of inodes, of file descriptors: this session cannot be served now
            raise EngineBusyError(f"could not make shared memory for another session's frames ({error}); "
                                  "serve fewer sessions") from error
        try:
            _reserve(block.name, size)
        except BaseException:
            block.close()
            block.unlink()
            raise
        return cls(block, height, width, owner=True)

    @classmethod
    def attach(cls, name: str, height: int, width: int) -> "FrameSlots":
        """The block another process made (``name`` as :attr:`name` gives it)."""
        return cls(shared_memory.SharedMemory(name=name), height, width, owner=False)

    @property
    def name(self) -> str:
        return self._block.name

    def write(self, slot: int, frame: np.ndarray) -> None:
        """Copy ``frame`` (``height×width×3`` uint8) into ``slot``."""
        self._view(slot)[...] = frame

    def read(self, slot: int) -> np.ndarray:
        """A private copy of the frame in ``slot``."""
        return self._view(slot).copy()

    def release(self) -> None:
        """Unmap the block, and unlink it when this process made it. Idempotent."""
        if not self._open:
            return
        self._open = False
        self._block.close()
        if self.owner:
            try:
                self._block.unlink()
            except FileNotFoundError:
                pass

    def _view(self, slot: int) -> np.ndarray:
        if not self._open:
            raise RuntimeError(f"shared frames {self.name} are released")
        size = int(np.prod(self.shape))
        return np.ndarray(self.shape, dtype=np.uint8, buffer=self._block.buf, offset=slot * size)


def _reserve(name: str, size: int) -> None:
    """Give the block ``name`` its ``size`` bytes of ``/dev/shm`` now, or refuse it: a block made with
    room to spare only on paper (tmpfs files are sparse) raises SIGBUS at the first write past the room."""
    path = SHM / name
    if not hasattr(os, "posix_fallocate") or not path.exists():  # not Linux: no such tmpfs to run out of
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as error:
        # ENOMEM: a container's memory limit counts tmpfs pages, and the next write would be OOM-killed
        if error.errno not in (errno.ENOSPC, errno.ENOMEM):
            log.warning("could not reserve shared memory for %s (%s); going on without", name, error)
            return
        room = os.statvfs(SHM)
        free = room.f_bavail * room.f_frsize
        raise EngineBusyError(
            f"no room in shared memory for another session's frames ({SHM} has {free / 2**20:.1f} MB free, a "
            f"session takes {2 * size / 2**20:.1f} MB); serve fewer sessions, or give diffcam more shared memory "
            "(in Docker: docker run --shm-size=1g)") from None
    finally:
        os.close(fd)


def to_model_rgb(frame: Frame, height: int, width: int) -> np.ndarray:
    """``frame`` (uint8 array, tensor, or decoded video frame) as RGB uint8 ``height×width×3``, cropped and
    scaled as the engine does (:func:`engine.image.fit`); a uint8 array of that size passes unchanged."""
    if isinstance(frame, np.ndarray) and frame.dtype == np.uint8 and frame.shape == (height, width, 3):
        return frame
    fitted = fit(to_chw(frame, torch.device("cpu")), height, width)
    return fitted.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
