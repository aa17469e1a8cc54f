"""What k devices would give one sharded stream, from one device: ``python -m engine.parallel.bench_components``.

    python -m engine.parallel.bench_components --model sd-turbo-random --device cuda --json out/components.json

For each number of denoising steps and each k, the UNet is cut as the sharded stream cuts it
(balanced estimated costs, :func:`~engine.parallel.split.balanced_bounds`), on the stream batch the
stream would run (``n`` rows per frame, twice that with ``--cfg-type full``). On this one device it
times the whole UNet and each component alone, on the inputs the components before it produce, and
as the ranks run them: through a :class:`~engine.parallel.rank_graph.RankGraph`, so on CUDA each is
replayed from a CUDA graph (eager, a UNet's time is mostly kernel launches, in proportion to a
component's kernel count rather than its work). It sizes every link the ranks would use: the
activations each component sends to later ones (:func:`~engine.parallel.links.activation_routes`)
and the noise prediction back to rank 0.

The model on paper: in asynchronous calls every component runs at once and the links carry the
previous call's activations meanwhile, so the UNet stage's period on k devices is the slowest
component or the slowest link, whichever is longer. ``links`` are priced at PCIe 4.0 x16 (about
25 GB/s a direction) and NVLink 4 (450 GB/s). ``predicted`` is the whole UNet's time over that
period: the UNet-stage speedup k such devices would give, were the components' times on them
what they are here (they are: each device runs the same kernels on the same shapes). The VAE, the
scheduler math and the latency of a message are left out; ``engine.parallel.bench_stream`` measures
the whole stream on k real processes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from typing import TYPE_CHECKING, Callable

from engine.config import StreamConfig, parse_t_index_list
from engine.parallel.flags import bench_parser, write_json
from engine.quiet import quiet_libraries

if TYPE_CHECKING:  # torch and the engine load in the functions that use them: --help answers before they do
    import torch

#: bytes a second one direction of each link carries, roughly (what the table prices transfers at)
LINKS = {"PCIe 4 x16": 25e9, "NVLink 4": 450e9}
TIMESTEP = 500


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser("engine.parallel.bench_components", __doc__, model="sd-turbo-random", size=512,
                          threads=False)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="float16 or float32 (default: float16 on CUDA)")
    parser.add_argument("--steps", default="32;0,16,32,45", metavar="LISTS",
                        help="t_index_lists to measure, separated by ';' (default: one step, then LCM's four)")
    parser.add_argument("--k", default="2,4", help="component counts to cut the UNet into")
    parser.add_argument("--cfg-type", default="self", choices=["none", "full", "self", "initialize"],
                        help="RCFG mode: full doubles the UNet rows")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs of each component (the median counts)")
    return parser


def timed_as_ranks_run(call: Callable[..., object], args: tuple, device: torch.device, repeats: int,
                       name: str) -> float:
    """The median seconds of ``call(*args)`` as a sharded rank runs it: a :class:`RankGraph` replay on CUDA
    (where a call that cannot be captured runs eagerly, on the ranks too), the call itself elsewhere."""
    from engine.parallel.rank_graph import RankGraph

    graph = RankGraph(call, device, graphs=device.type == "cuda", name=name)
    graph.prepare(*args)
    return timed(lambda: graph(*args), device, repeats)


def timed(run: Callable[[], object], device: torch.device, repeats: int) -> float:
    """The median seconds of ``run`` (after three untimed runs), each run complete on the device."""
    from engine.parallel.costs import synchronizer

    sync = synchronizer(device)
    for _ in range(3):
        run()
    sync()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        sync()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def measure(unet, config: StreamConfig, ks: list[int], device: torch.device, dtype: torch.dtype,
            repeats: int, text_tokens: int) -> list[dict]:
    """One row per k: the cuts, each component's seconds, the links' bytes, the prediction per interconnect."""
    import torch

    from engine.parallel.costs import estimate_costs
    from engine.parallel.links import HIDDEN, activation_routes
    from engine.parallel.split import UNetSplit, balanced_bounds

    with torch.inference_mode():
        rows = config.unet_batch_size
        latent = (rows, unet.config.in_channels, *config.latent_size)
        generator = torch.Generator(device="cpu").manual_seed(0)
        sample = torch.randn(*latent, generator=generator).to(device, dtype)
        text = torch.randn(rows, text_tokens, unet.config.cross_attention_dim, generator=generator).to(device, dtype)
        timestep = torch.tensor(TIMESTEP, device=device)  # a device tensor: a Python number is copied in, uncapturable
        whole = timed_as_ranks_run(lambda x, t, states: unet(x, t, encoder_hidden_states=states, return_dict=False)[0],
                                   (sample, timestep, text), device, repeats, "whole UNet")
        costs = estimate_costs(unet, latent, text_tokens)
        element = torch.empty((), dtype=dtype).element_size()
        results = []
        for k in ks:
            split = UNetSplit(unet, balanced_bounds(costs, k))
            temb = split.embed(timestep, rows, dtype)
            inputs, outputs, skips, hidden = [], [], {}, sample
            for index in range(k):  # each component's real inputs: what the ones before it produced
                inputs.append((hidden, dict(skips)))
                hidden, gives = split.run(index, hidden, skips, temb, text, tuple(latent[-2:]))
                outputs.append({HIDDEN: hidden, **gives})
                skips.update(gives)
            seconds = [timed_as_ranks_run(partial(split.run, index, latent_size=tuple(latent[-2:])),
                                          (*inputs[index], temb, text), device, repeats, f"UNet component {index}")
                       for index in range(k)]
            links = [sum(outputs[r.src][item].numel() for item in r.items) * element
                     for r in activation_routes(split.components)]
            links.append(sample.numel() * element)  # the noise prediction, rank k-1 to rank 0
            results.append(row(config, k, split.bounds, whole, seconds, links))
        return results


def row(config: StreamConfig, k: int, bounds: tuple[int, ...], whole: float, seconds: list[float],
        links: list[int]) -> dict:
    slowest = max(seconds)
    predicted = {name: whole / max(slowest, max(links) / rate) for name, rate in LINKS.items()}
    return {"steps": config.denoising_steps, "rows": config.unet_batch_size, "k": k,
            "cuts": " \\| ".join(f"{a}–{b - 1}" for a, b in zip(bounds, bounds[1:])),  # a Markdown cell
            "whole_ms": 1e3 * whole, "component_ms": [1e3 * s for s in seconds],
            "balance_bound": sum(seconds) / slowest, "largest_link_mib": max(links) / 2**20,
            "all_links_mib": sum(links) / 2**20,
            "link_ms": {name: 1e3 * max(links) / rate for name, rate in LINKS.items()},
            "predicted_speedup": predicted}


def table(rows: list[dict]) -> str:
    names = list(LINKS)
    lines = ["| steps | rows | k | cuts (blocks) | whole UNet ms | components ms | balance bound | largest link "
             "| all links | " + " | ".join(f"{n} ms" for n in names) + " | "
             + " | ".join(f"predicted, {n}" for n in names) + " |",
             "|" + "---|" * (9 + 2 * len(names))]
    for r in rows:
        lines.append(f"| {r['steps']} | {r['rows']} | {r['k']} | {r['cuts']} | {r['whole_ms']:.2f} | "
                     + " / ".join(f"{ms:.2f}" for ms in r["component_ms"])
                     + f" | {r['balance_bound']:.2f}× | {r['largest_link_mib']:.1f} MiB | {r['all_links_mib']:.1f} MiB | "
                     + " | ".join(f"{r['link_ms'][n]:.2f}" for n in names) + " | "
                     + " | ".join(f"{r['predicted_speedup'][n]:.2f}×" for n in names) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # before torch loads: --help and bad flags answer at once
    import torch

    from engine.models import ModelSpec, load_components

    quiet_libraries()
    try:
        lists = [parse_t_index_list(text) for text in args.steps.split(";") if text.strip()]
        ks = [int(part) for part in args.k.split(",") if part.strip()]
        if not lists or not ks or min(ks) < 2:
            raise ValueError("give at least one --steps list and --k values of 2 or more")
        if not 1 <= args.repeats <= 10_000:
            raise ValueError(f"--repeats {args.repeats} is out of range; allowed: [1, 10000]")
        configs = [StreamConfig(t_index_list=t, width=args.size, height=args.size, cfg_type=args.cfg_type,
                                guidance_scale=1.0 if args.cfg_type == "none" else 1.2) for t in lists]
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        components = load_components(ModelSpec(model=args.model, device=str(device), dtype=args.dtype))
    except (ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    unet, dtype = components.unet.eval(), components.dtype
    text_tokens = components.tokenizer.model_max_length
    rows = []
    for config in configs:
        print(f"  {config.denoising_steps} step(s), {config.unet_batch_size} UNet rows ...", file=sys.stderr)
        rows += measure(unet, config, ks, device, dtype, args.repeats, text_tokens)
    print(table(rows))
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n{args.model} {args.size}x{args.size} {str(dtype).removeprefix('torch.')} on {gpu}, "
          f"cfg {args.cfg_type}, median of {args.repeats}; torch {torch.__version__}")
    write_json(args.json, {"device": gpu, "dtype": str(dtype), "args": vars(args), "links_bytes_per_s": LINKS,
                           "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
