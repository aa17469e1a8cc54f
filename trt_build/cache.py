"""The engine cache: built TensorRT engines on disk, found again by what they were built from.

An engine is only valid for the weights, shapes, precision, TensorRT version and GPU it was
built for, and a stale one fails in the worst way: it loads and gives wrong pictures, or it
refuses to deserialize after a driver upgrade. So the cache key holds all of them, and the
weights enter as a fingerprint of the loaded tensors (a fused LoRA or a fine-tune changes it),
not as a name that could point at other weights tomorrow.

Layout: ``<root>/<part>-<digest>.plan`` with ``<part>-<digest>.json`` beside it holding the
key in full (for people, and to refuse a file whose sidecar disagrees). Writes go to a
temporary file renamed into place, so a build killed half-way leaves nothing to load.

Several processes may want one engine at once (replicas starting together, ``python -m trt_build``
beside a starting app). :meth:`EngineCache.get_or_build` lets one build it while the others wait on
``<part>-<digest>.plan.lock`` (``flock``, released by the kernel even if the builder is killed),
then load what it built. Lock files stay: deleting one that a waiting process has open would let
a third build alongside the first.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Callable

import torch

from trt_build.shapes import ShapeProfile

if sys.platform != "win32":
    import fcntl

log = logging.getLogger(__name__)

#: Bump when what the exported graphs compute or take changes (export.py, adapters.py):
#: engines built by older code must not load.
FORMAT_VERSION = 1
PRECISIONS = ("fp16", "fp32", "bf16")


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on."""

    part: str                 # unet, vae_encoder, vae_decoder
    model: str                # hub id, path or preset name, for people
    weights: str              # weights_fingerprint() of the exported module
    lora: str | None          # fused LoRA, for people (its effect is in ``weights``)
    profile: ShapeProfile     # batch and resolution ranges
    precision: str            # fp16 / fp32 / bf16
    tensorrt: str             # TensorRT version
    compute_capability: str   # of the GPU, e.g. "9.0"
    gpu: str                  # its name: tactics are timed on this very chip
    opset: int
    format: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}; allowed: {list(PRECISIONS)}")

    def as_dict(self) -> dict:
        return asdict(self)

    def digest(self) -> str:
        text = json.dumps(self.as_dict(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    @property
    def filename(self) -> str:
        return f"{self.part}-{self.digest()}.plan"


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A digest of the configs of every diffusers model inside ``module`` (a VAE's scaling factor is
    baked into its graph) and of every parameter and buffer: name, shape, dtype and every byte.

    Exact: raw bytes, with no float sums that could differ between devices, so any change to any
    weight names another engine. An SD UNet in fp16 is 1.7 GB to read, a few seconds, paid once
    per start (see :class:`trt_build.pipeline.BuildPlan`).
    """
    digest = hashlib.sha256()
    for name, child in module.named_modules():
        config = getattr(child, "config", None)
        if isinstance(config, dict):  # diffusers' FrozenDict
            digest.update(f"{name}|{json.dumps(dict(config), sort_keys=True, default=str)}|".encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        if tensor.numel():
            digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().data)
    return digest.hexdigest()[:20]


def default_cache_dir() -> Path:
    """``$DIFFCAM_CACHE/engines``, else ``$XDG_CACHE_HOME/diffcam/engines``, else ``~/.cache/diffcam/engines``."""
    if os.environ.get("DIFFCAM_CACHE"):
        return Path(os.environ["DIFFCAM_CACHE"]).expanduser() / "engines"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "diffcam" / "engines"


class EngineCache:
    """Engines under ``root``, looked up by :class:`EngineKey`."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()

    def path(self, key: EngineKey) -> Path:
        return self.root / key.filename

    def get(self, key: EngineKey) -> Path | None:
        """The engine built for ``key``, or None (missing, or its sidecar describes another key)."""
        plan, sidecar = self.path(key), self.path(key).with_suffix(".json")
        if not (plan.is_file() and sidecar.is_file()):
            return None
        try:
            recorded = json.loads(sidecar.read_text("utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        return plan if recorded == json.loads(json.dumps(key.as_dict(), default=str)) else None

    def put(self, key: EngineKey, write: Callable[[Path], None]) -> Path:
        """Have ``write`` produce the engine into a temporary file, then move it (and its sidecar) into place."""
        self.root.mkdir(parents=True, exist_ok=True)
        plan = self.path(key)
        _atomic(plan, write)
        _atomic(plan.with_suffix(".json"),
                lambda tmp: tmp.write_text(json.dumps(key.as_dict(), indent=2, default=str), "utf-8"))
        return plan

    def get_or_build(self, key: EngineKey, build: Callable[[Path], None],
                     progress: Callable[[str], None] = log.warning) -> tuple[Path, bool]:
        """The cached engine for ``key``, building it first if needed; True when it was built now.

        One process builds while any other wanting the same engine waits (saying so through
        ``progress``), then finds it here instead of building it again.
        """
        found = self.get(key)
        if found is not None:
            return found, False
        self.root.mkdir(parents=True, exist_ok=True)
        plan = self.path(key)
        with _exclusive(plan.with_name(plan.name + ".lock"),
                        lambda: progress(f"waiting for another process building {plan.name}")):
            found = self.get(key)  # built by the process that held the lock
            return (found, False) if found is not None else (self.put(key, build), True)


@contextmanager
def _exclusive(path: Path, waiting: Callable[[], None]) -> Iterator[None]:
    """Hold an exclusive lock on ``path``, calling ``waiting`` first when another process holds it."""
    with open(path, "a") as handle:  # flock locks an open file: two opens exclude each other, even in one process
        _lock(handle, waiting)
        yield


def _lock(handle: IO[str], waiting: Callable[[], None]) -> None:
    if sys.platform == "win32":  # no flock: builds there are not coordinated
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        waiting()
        fcntl.flock(handle, fcntl.LOCK_EX)
    except OSError as error:  # a file system without locks (some FUSE mounts): build, as before locking
        if error.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
        log.warning("cannot lock %s (%s): not waiting for other processes building it", handle.name, error)


def _atomic(target: Path, write: Callable[[Path], object]) -> None:
    handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(name)
    try:
        write(temporary)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
