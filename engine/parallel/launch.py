"""One process per device, started together and torn down together.

:func:`launch` spawns ``world_size`` processes (``torch.multiprocessing``, spawn), joins them
into one ``torch.distributed`` group, runs ``target`` in each and returns rank 0's result. The
group meets through a file in a private temporary folder (no listening socket for it); gloo's
own connections stay on the loopback interface. A rank that raises or dies is reported as
:class:`RankFailed`, naming the rank and why (a raising rank's traceback included); the others
are stopped (SIGTERM, then SIGKILL after ``grace_s``) before it is raised, and a run that
outlives ``timeout_s`` is stopped the same way. The children also die with this process
(daemonic, and on Linux a parent-death signal), so a killed driver leaves no ranks behind.

A rank that raises aborts its process groups rather than destroying them: NCCL's destroy drains
the work in flight, and a failed rank nearly always has a receive posted that no send will ever
match, so it would never exit and its error would never reach the driver. It writes its
traceback into the launch's folder and exits at once; the driver reads it from there.

Under ``torchrun`` (which starts the processes itself and sets ``RANK``, ``WORLD_SIZE`` and
``TORCHELASTIC_RUN_ID``), ``launch(..., torchrun=True)`` spawns nothing: this process runs ``target`` as its rank
in the group torchrun's rendezvous gives (``env://``; ``DIFFCAM_INIT_METHOD`` overrides it, e.g.
``file:///path``), rank 0 gets the result and the other ranks None, and torchrun itself stops
every rank when one fails. A rank that raises there aborts its groups too, then lets the exception
propagate to the command, which prints it and exits.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, NoReturn

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed import distributed_c10d

from engine.parallel.torchrun import torchrun_rank

RankTarget = Callable[..., Any]  # target(rank, world_size, *args) -> result (rank 0's is returned)
POLL_S = 0.2


class RankFailed(RuntimeError):
    """A rank raised, died, or the run took too long; the message says which rank and why."""

    def __init__(self, message: str, rank: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank


@dataclass(frozen=True)
class GroupSpec:
    """How each rank joins the group: ``backend`` gloo (CPU) or nccl (CUDA), ``timeout_s`` per collective.

    ``devices``: rank r's CUDA device is ``devices[r]``; it becomes the rank's current device before
    the group forms, so NCCL binds to it and everything the rank does on CUDA happens there.
    """

    backend: str = "gloo"
    timeout_s: float = 60.0
    threads: int = 1
    devices: tuple[str, ...] = ()


def launch(target: RankTarget, world_size: int, args: tuple = (), *, group: GroupSpec = GroupSpec(),
           timeout_s: float = 600.0, grace_s: float = 2.0,
           started: Callable[[list[int]], None] | None = None, torchrun: bool = False) -> Any:
    """Run ``target(rank, world_size, *args)`` on ``world_size`` ranks; rank 0's return value.

    ``started``, if given, gets the ranks' pids as soon as they exist (tests use it to check
    that none is left over). ``torchrun``: under torchrun, join its group as this process's rank
    instead of spawning (a command's own choice: an app's engine always spawns its own ranks).
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be at least 1")
    joined = torchrun_rank() if torchrun else None
    if joined is not None:
        rank, world = joined
        if world != world_size:
            raise ValueError(f"torchrun started {world} processes, but this run needs {world_size}: "
                             f"torchrun --nproc-per-node {world_size} ...")
        torch.set_num_threads(group.threads)
        dist.init_process_group(group.backend, init_method=os.environ.get("DIFFCAM_INIT_METHOD", "env://"),
                                rank=rank, world_size=world, timeout=timedelta(seconds=group.timeout_s),
                                device_id=_set_device(group, rank))
        return _run_rank(rank, target, args)
    with tempfile.TemporaryDirectory(prefix="diffcam-ranks-") as folder:
        context = mp.start_processes(_rank_entry, args=(world_size, folder, group, target, args),
                                     nprocs=world_size, join=False, daemon=True, start_method="spawn")
        if started:
            started(context.pids())
        _join(context, Path(folder), timeout_s, grace_s)
        return pickle.loads(Path(folder, "result.pkl").read_bytes())


def _join(context: mp.ProcessContext, folder: Path, timeout_s: float, grace_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=POLL_S, grace_period=grace_s):
            if time.monotonic() > deadline:
                raise RankFailed(f"the ranks did not finish within {timeout_s:.0f} s; they were stopped")
    except mp.ProcessRaisedException as error:
        raise RankFailed(f"rank {error.error_index} failed; the other ranks were stopped.{error}",
                         error.error_index) from None
    except mp.ProcessExitedException as error:
        raise _exited(error, _report(folder, error.error_index)) from None
    finally:
        _stop(context, grace_s)


def _exited(error: mp.ProcessExitedException, report: Path) -> RankFailed:
    """The failure of a rank whose process ended: the traceback it left in ``report``, else how it ended."""
    rank = error.error_index
    if report.exists():
        return RankFailed(f"rank {rank} failed; the other ranks were stopped.\n\n{report.read_text()}", rank)
    how = f"was killed by {error.signal_name}" if error.signal_name else f"exited with code {error.exit_code}"
    return RankFailed(f"rank {rank} (pid {error.error_pid}) {how}; the other ranks were stopped", rank)


def _report(folder: Path, rank: int) -> Path:
    """Where rank ``rank`` leaves its traceback when its target raises."""
    return folder / f"error-{rank}.txt"


def _stop(context: mp.ProcessContext, grace_s: float) -> None:
    """SIGTERM what is still running, SIGKILL what outlives ``grace_s``, and reap everything."""
    alive = [p for p in context.processes if p.is_alive()]
    for process in alive:
        process.terminate()
    deadline = time.monotonic() + grace_s
    for process in alive:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in context.processes:
        if process.is_alive():
            process.kill()
        process.join()


def _rank_entry(rank: int, world_size: int, folder: str, group: GroupSpec, target: RankTarget,
                args: tuple) -> None:
    _die_with_parent()
    torch.set_num_threads(group.threads)
    if sys.platform.startswith("linux"):  # gloo's pairs on loopback only (the default group's, or any gloo group's)
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    store = dist.FileStore(str(Path(folder, "rendezvous")), world_size)
    dist.init_process_group(group.backend, store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=group.timeout_s), device_id=_set_device(group, rank))
    try:
        result = _run_rank(rank, target, args, _report(Path(folder), rank))
    except Exception:
        _exit_at_once()
    if rank == 0:
        partial = Path(folder, "result.pkl.partial")
        partial.write_bytes(pickle.dumps(result))
        partial.rename(Path(folder, "result.pkl"))


def _set_device(group: GroupSpec, rank: int) -> torch.device | None:
    """Make the rank's CUDA device current (before the group forms, so NCCL binds to it); None on the CPU."""
    device = torch.device(group.devices[rank]) if group.devices else None
    if device is None or device.type != "cuda":
        return None
    torch.cuda.set_device(device)
    return device


def _run_rank(rank: int, target: RankTarget, args: tuple, report: Path | None = None) -> Any:
    """``target`` as this rank of the group just formed; rank 0's result (None on the others).

    Only a rank that finished waits for the others and destroys its groups; one that raised writes its
    traceback to ``report`` (if given), aborts its groups (see the module's docstring) and re-raises.
    """
    try:
        result = target(rank, dist.get_world_size(), *args)
        dist.barrier()
    except BaseException:
        if report is not None:  # first: an abort may itself wait, up to the group's timeout
            report.write_text(traceback.format_exc())
        _abort_groups()
        raise
    dist.destroy_process_group()
    return result if rank == 0 else None


def _abort_groups() -> None:
    """Drop every process group of this rank without waiting for the work in flight (NCCL and gloo alike)."""
    abort = getattr(distributed_c10d, "_abort_process_group", None)  # torch 2.5 on; without it, exiting will do
    if abort is None:
        return
    try:
        abort()
    except Exception:  # noqa: BLE001 - the rank is failing already; its own error is the one to report
        pass


def _exit_at_once() -> NoReturn:
    """End a failed rank's process now (its traceback is in its report already).

    At once: the interpreter's shutdown would wait for any thread the target left running, and the driver
    hears of a rank only when its process ends.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def _die_with_parent() -> None:
    """On Linux, ask the kernel to SIGKILL this rank when the launching process dies."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent died before the call
        os.kill(os.getpid(), signal.SIGKILL)
