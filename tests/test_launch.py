"""A rank that raises is reported by the driver with its own error, even where destroying its groups would hang.

NCCL's ``destroy_process_group`` drains the work in flight; a rank that raised with a receive posted that no
send will match would wait there for ever, and its traceback would never reach the driver. Gloo does not
drain, so these ranks stand in for NCCL: a destroy that never returns.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from engine.parallel.launch import GroupSpec, RankFailed, launch
from tests.test_asyncdiff import _exists  # whether a pid (or its zombie) is still there

GROUP = GroupSpec(timeout_s=60.0)


def _destroy_like_nccl(group: object = None) -> None:
    """A graceful destroy with a receive posted that nothing will match: it never returns."""
    time.sleep(3600)


def _raise_with_a_receive_posted(rank: int, world_size: int) -> None:
    dist.destroy_process_group = _destroy_like_nccl  # this rank's process only
    if rank == 0:
        time.sleep(3600)  # waiting for rank 1, as a sharded rank 0 waits for its prediction
    dist.irecv(torch.zeros(4), src=0)  # the next command, which will never come
    raise ValueError(f"rank {rank} broke mid-run")


def test_a_rank_that_raises_mid_run_is_reported_with_its_error_and_no_rank_is_left() -> None:
    pids: list[int] = []
    with pytest.raises(RankFailed, match=r"rank 1 failed(.|\n)*ValueError: rank 1 broke mid-run") as failure:
        launch(_raise_with_a_receive_posted, 2, group=GROUP, timeout_s=120.0, started=pids.extend)
    assert failure.value.rank == 1
    assert not [pid for pid in pids if _exists(pid)], "a rank outlived the failure (or was never reaped)"


def _finish(rank: int, world_size: int) -> int:
    return rank + world_size


def test_ranks_that_finish_return_rank_0s_result() -> None:
    assert launch(_finish, 2, group=GROUP) == 2


def test_under_torchrun_a_rank_that_raises_aborts_its_groups_and_raises(tmp_path, monkeypatch, one_thread) -> None:
    """In this process, as torchrun's rank 0 of 1 (``one_thread`` restores the threads launch sets)."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("DIFFCAM_INIT_METHOD", f"file://{tmp_path / 'rendezvous'}")
    monkeypatch.setattr(dist, "destroy_process_group", _refuse_a_graceful_destroy)
    with pytest.raises(ValueError, match="rank 0 broke"):
        launch(_raise, 1, torchrun=True)
    assert not dist.is_initialized()


def _refuse_a_graceful_destroy(group: object = None) -> None:
    raise AssertionError("a rank that raised destroyed its groups gracefully")


def _raise(rank: int, world_size: int) -> None:
    raise ValueError(f"rank {rank} broke")
