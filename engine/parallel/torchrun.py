"""Whether ``torchrun`` started this process: plain ``os.environ``, no torch, so a command can ask before it loads.

Only ``python -m engine.parallel.asyncdiff`` joins the group torchrun forms. The app, ``app.stylize``
and the benchmarks start their own process per device, and N copies of them started by torchrun
would each do so (and fight over the port): they refuse, with the command that does what was meant.
"""

from __future__ import annotations

import os


def torchrun_rank() -> tuple[int, int] | None:
    """``(rank, world size)`` when ``torchrun`` started this process, else None."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        raise ValueError("TORCHELASTIC_RUN_ID is set but RANK and WORLD_SIZE are not: start this under torchrun, "
                         "or unset it") from None


def refuse_torchrun(command: str) -> None:
    """Raise ValueError, saying what to run instead, when ``torchrun`` started ``command`` (e.g. ``app/main.py``)."""
    joined = torchrun_rank()
    if joined is None:
        return
    rank, world = joined
    raise ValueError(f"{command} was started by torchrun (rank {rank} of {world}), but it starts its own process "
                     f"per device: run it without torchrun, e.g. `{command} --devices 0,1 ...`. Only "
                     f"`torchrun --nproc-per-node N -m engine.parallel.asyncdiff ...` runs under torchrun")
