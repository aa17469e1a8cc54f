"""Command-line pieces the several-device commands share: ``--devices`` / ``--parallel``, and the
preamble of the parallel benchmarks (:mod:`engine.parallel.bench`, :mod:`~engine.parallel.bench_stream`,
:mod:`~engine.parallel.bench_replicas`).

``--devices`` is read by :func:`engine.parallel.replicas.parse_devices` everywhere, so ``0,1``,
``cuda:0,cuda:1`` and ``cpu,cpu`` mean the same to the app, ``engine.bench`` and ``app.stylize``.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.cli import HelpFormatter

#: ``--parallel`` choices: one stream's UNet cut over the devices, or one whole model per device
PARALLEL_MODES = ("asyncdiff", "replicas")
#: ``--steps N``: the t_index_list each number of denoising steps is measured with
T_INDEX = {1: (30,), 2: (20, 35), 4: (10, 20, 30, 40)}

DEVICES_HELP = "0,1 (CUDA indices), cuda:0,cuda:1, or cpu,cpu (each CPU process stands for a device)"
PARALLEL_HELP = ("how several --devices share the work: asyncdiff (one stream's UNet cut into one component per "
                 "device, each running on what the one before it produced on the previous call; a stream gets "
                 "faster) or replicas (each device holds the whole model in its own process and serves its own "
                 "streams; more streams at once)")


def add_parallel_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, devices: str,
                           default: str) -> None:
    """``--devices LIST`` and ``--parallel {asyncdiff,replicas}``; ``devices`` and ``default`` end their help.

    ``--parallel`` defaults to None, which each command resolves (and says how in ``default``).
    """
    parser.add_argument("--devices", default=None, metavar="LIST", help=f"{devices}: {DEVICES_HELP}")
    parser.add_argument("--parallel", default=None, choices=PARALLEL_MODES, help=f"{PARALLEL_HELP}; {default}")


def bench_parser(module: str, description: str | None, *, model: str = "small", size: int = 256,
                 threads: bool = True) -> argparse.ArgumentParser:
    """The parser every parallel benchmark starts from: ``--model --size --json`` (and ``--threads``).

    ``module``: what follows ``python -m``; ``description``: the benchmark's module docstring.
    """
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--model", default=model, help="a preset (tiny, small) or any model spec")
    parser.add_argument("--size", type=int, default=size, help="square frame size, in pixels")
    if threads:
        parser.add_argument("--threads", type=int, default=1,
                            help="torch threads per process (on a CPU, one each: every process stands for a core)")
    parser.add_argument("--json", default=None, help="write the results here")
    return parser


def add_steps_arguments(parser: argparse.ArgumentParser, default: str | None) -> None:
    """``--steps 1,4`` (configurations by number of steps, :data:`T_INDEX`) or ``--t-index-list 20,35`` (one)."""
    steps = parser.add_mutually_exclusive_group()
    steps.add_argument("--steps", default=default,
                       help=f"denoising steps per frame, comma-separated, each one of {sorted(T_INDEX)}: "
                            f"t_index_list {', '.join(f'{n}: {list(t)}' for n, t in T_INDEX.items())}")
    steps.add_argument("--t-index-list", default=None,
                       help="one configuration with these denoising steps out of 50, e.g. 20,35 (replaces --steps)")


def schedules(args: argparse.Namespace, fallback: tuple[int, ...] | None = None) -> list[tuple[int, ...]]:
    """The t_index_lists to measure: ``--t-index-list``, or one per ``--steps`` entry, or ``fallback``;
    ``ValueError`` naming the flag."""
    from engine.config import parse_t_index_list

    if args.t_index_list is not None:
        return [parse_t_index_list(args.t_index_list)]
    if args.steps is None and fallback is not None:
        return [fallback]
    steps = [int(s) for s in str(args.steps).split(",")]
    unknown = [n for n in steps if n not in T_INDEX]
    if unknown:
        raise ValueError(f"--steps {args.steps}: {unknown} not among {sorted(T_INDEX)}; or give --t-index-list")
    return [T_INDEX[n] for n in steps]


def given_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """The ``dest`` of every option ``argv`` names (abbreviated or not), left at its default or not.

    Lets a command pass on to another only what the user asked for, keeping the other's defaults.
    """
    quiet = argparse.ArgumentParser(add_help=False, allow_abbrev=parser.allow_abbrev)
    for action in parser._actions:
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            quiet._add_action(_suppressed(action))
    found, _ = quiet.parse_known_args(argv)
    return set(vars(found))


def _suppressed(action: argparse.Action) -> argparse.Action:
    """A copy of ``action`` that leaves its ``dest`` out of the namespace unless the option is given."""
    twin = copy.copy(action)
    twin.default, twin.required = argparse.SUPPRESS, False
    return twin


def write_json(path: str | None, record: dict[str, Any]) -> None:
    """Write a benchmark's record to ``path`` (its folder made first), if a path was given. Whole or not at all:
    a benchmark stopped mid-write (gpu-check's time limits) leaves the record it wrote before."""
    if not path:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    partial.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    partial.replace(target)
    print(f"wrote {path}")


def free_cores(procs: int) -> float:
    """How many cores ``procs`` busy processes get here (``procs`` on an idle machine): a shared machine check."""
    context = multiprocessing.get_context("fork")  # before any model or thread exists: cheap and safe
    with ProcessPoolExecutor(procs, mp_context=context) as pool:
        alone = min(pool.submit(_spin).result() for _ in range(2))
        together = max(pool.map(_spin, [5_000_000] * procs))
    return procs * alone / together


def say_free_cores(procs: int) -> float:
    """Print :func:`free_cores` as a benchmark's first line (a CPU benchmark's speedups need it beside them)."""
    cores = free_cores(procs)
    print(f"{procs} busy processes get {cores:.2f} cores here"
          + ("" if cores > 0.8 * procs else ": the machine is shared, parallel modes cannot show their speed"),
          file=sys.stderr, flush=True)
    return cores


def _spin(iterations: int = 5_000_000) -> float:
    start = time.perf_counter()
    total = 0
    for i in range(iterations):
        total += i
    return time.perf_counter() - start
