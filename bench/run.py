"""Run every benchmark of TAGI against its alternatives, print the tables and write one JSON file.

    python -m bench.run --quick --out bench.json          # CPU-sized, under 150 s on 2 idle cores
    python -m bench.run --out bench-full.json             # full sizes (the default mode)
    python -m bench.run --device cuda --out bench-gpu.json
    python -m bench.run --smoke --out /tmp/smoke.json      # tiniest sizes, 1 round: checks that everything runs

Benchmarks: 1 inference (bench/inference.py), 2 adapter generation (generation.py), 3 mixed-task batch
(mixed_batch.py), 4 training time and peak memory (training.py), 5 scaling over r and instruction length
(scaling.py, plus a plot next to --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from bench import generation, inference, mixed_batch, scaling, training
from bench.common import MODES, available_cpus, environment, print_result, table

ROOT = Path(__file__).resolve().parents[1]

BENCHMARKS = ("inference", "generation", "mixed_batch", "training", "scaling")
TITLES = {
    "inference": "1. Inference: one task, instruction read once (TAGI) vs with every input",
    "generation": "2. Adapter generation latency",
    "mixed_batch": "3. Mixed-task batch: per-example adapters vs one merged LoRA",
    "training": "4. Training: distill step vs plain LoRA step (time, peak memory)",
    "scaling": "5. Scaling over r and instruction length",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--full", dest="mode", action="store_const", const="full", help="full sizes (default)")
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick", help="CPU-sized: < 5 min, 2 cores")
    mode.add_argument("--smoke", dest="mode", action="store_const", const="smoke", help="tiniest sizes, 1 round")
    parser.set_defaults(mode="full")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default bench/results-MODE-DEVICE.json)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds of every benchmark (default: mode's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the CPUs available)")
    parser.add_argument(
        "--decode", choices=("forward", "generate"), default="forward",
        help="scaling sweep's inference work (benchmark 1 always runs generate at 1, 10, 100 and a forward row)",
    )  # fmt: skip
    parser.add_argument(
        "--batch-size", type=int, default=None,
        help="benchmark 1's headline batch size (added to its generate rows) and forward row (default: 10)",
    )  # fmt: skip
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=None, help="run only these benchmarks")
    parser.add_argument("--plot", type=Path, default=None, help="scaling plot (default: next to --out)")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    return args


def goals_summary(results: dict[str, dict]) -> list[dict]:
    goals = []
    for bench, result in results.items():
        for name, entry in result["ratios"].items():
            if entry.get("goal_max") is not None:
                goals.append({"benchmark": bench, "ratio": name, "value": entry["value"], "goal_max": entry["goal_max"],
                              "met": entry["met"]})  # fmt: skip
    return goals


def print_scaling(result: dict) -> None:
    print(f"\n=== {TITLES['scaling']} ===")
    print(result["description"])
    rows = []
    for p in result["points"]:
        row = [str(p["r"]), str(p["instruction_len"])]
        for key, *_ in scaling.METRICS:
            entry = p.get(key)
            row.append("-" if entry is None else f"{entry['value']:.3f}" + ("" if entry["met"] else " MISSED"))
        sources = sorted(set(p["source"].values()))
        rows.append(row + [" + ".join(sources)])
    headers = ["r", "t"] + [f"{key} (<= {goal:g})" for key, _l, goal, *_ in scaling.METRICS] + ["source"]
    print(table(headers, rows))
    missed = [name for name, e in result["ratios"].items() if e.get("met") is False]
    if missed:
        print("GOAL MISSED at: " + "; ".join(missed))


def print_serving_table(rows: dict[str, dict]) -> None:
    """Benchmark 1's grid: one line per decoding mode and batch size (medians of interleaved rounds)."""
    names = [n for n in next(iter(rows.values())) if "/" in n]
    variants = [n for n in next(iter(rows.values())) if "/" not in n]
    lines = [[row, *(f"{v[n]:.3f}" for n in names), *(f"{v[n]:.2f}" for n in variants)] for row, v in rows.items()]
    print(table(["work", *names, *(f"{n} s" for n in variants)], lines))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    threads = args.threads or available_cpus()
    torch.set_num_threads(threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here")
    sizes = MODES[args.mode]
    if args.repeats is not None:
        sizes = dataclasses.replace(
            sizes, repeats=args.repeats, generation_repeats=args.repeats, mixed_repeats=args.repeats,
            scaling_repeats=args.repeats,
        )  # fmt: skip
    if args.batch_size is not None:
        sizes = dataclasses.replace(sizes, batch_size=args.batch_size)
    out = args.out or ROOT / "bench" / f"results-{args.mode}-{device.type}.json"
    plot_path = args.plot or out.with_name(out.stem + "_scaling.png")
    selected = args.only or list(BENCHMARKS)
    env = environment(device)

    deviations = sizes.deviations()
    notes = []
    if deviations:
        notes.append(
            f"{args.mode} mode: sizes differ from the full run: "
            + ", ".join(f"{k}={v[0]} (full {v[1]})" for k, v in deviations.items())
        )
    if args.mode == "smoke":
        notes.append(
            "smoke mode: sizes far too small for the ratios or goals to mean anything; it checks the plumbing"
        )
    load = env.get("load_average_at_start", [0.0])[0]
    if load > 0.5:
        notes.append(
            f"the machine was busy at the start (load average {load:.1f} on {available_cpus()} CPUs): timings are "
            "noisier and, with as many threads as CPUs, thread contention can slow every variant"
        )
    if device.type == "cuda":
        notes.append(
            "cuda: at these sizes one forward takes milliseconds, so Python and kernel-launch overheads weigh much "
            "more than on a CPU; --batch-size 50 or 100 shows the compute-bound picture of benchmark 1"
        )
    if args.mode == "quick":
        notes.append(
            "quick mode: fewer layers make the fixed costs (hypernetwork, LoRA heads, lm_head) weigh more than in the "
            "full model, so generation and training ratios come out higher than at full depth"
        )
    print(f"peft-tagi benchmarks, mode {args.mode}, device {device}, {threads} threads, torch {torch.__version__}")
    print(f"CPU: {env['cpu_model']}" + (f"; GPU: {env['gpu']}" if "gpu" in env else ""))
    print(
        f"model: T5 d_model {sizes.d_model}, d_ff {sizes.d_ff}, {sizes.num_heads} heads x d_kv {sizes.d_kv}, "
        f"{sizes.num_layers}+{sizes.num_decoder_layers} layers, vocab {sizes.vocab_size}, random weights; lengths: "
        f"instruction {sizes.instruction_len}, input {sizes.input_len}, output {sizes.output_len}; r={sizes.r}"
    )
    for note in notes:
        print("NOTE: " + note)

    results: dict[str, dict] = {}
    runners = {
        "inference": lambda: inference.run_serving(sizes, device),
        "generation": lambda: generation.run(sizes, device),
        "mixed_batch": lambda: mixed_batch.run(sizes, device),
        "training": lambda: training.run(sizes, device, threads),
    }
    for name in BENCHMARKS:
        if name not in selected:
            continue
        print(f"\nrunning {name} ...", flush=True)
        if name == "scaling":
            result = scaling.run(sizes, device, threads, results, decode=args.decode)
            title = f"TAGI scaling ({args.mode} mode, {device.type}, {threads} threads)"
            result["plot"] = str(scaling.plot(result, sizes, plot_path, title))
            results[name] = result
            print_scaling(result)
            print(f"plot: {result['plot']}")
        else:
            results[name] = runners[name]()
            print_result(TITLES[name], results[name])
            if "table" in results[name]:
                print_serving_table(results[name]["table"])
        gc.collect()

    goals = goals_summary(results)
    wall = time.perf_counter() - started
    try:
        env["load_average_at_end"] = list(os.getloadavg())
    except OSError:
        pass
    report = {
        "mode": args.mode,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "device": str(device),
        "decode": args.decode,
        "sizes": sizes.to_dict(),
        "deviations_from_full": {k: {"this_run": v[0], "full": v[1]} for k, v in deviations.items()},
        "notes": notes,
        "environment": env,
        "benchmarks": results,
        "goals": goals,
        "all_goals_met": all(g["met"] for g in goals),
        "wall_time_s": wall,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    print("\n=== Goals ===")
    rows = [[g["benchmark"], g["ratio"], f"{g['value']:.3f}", f"<= {g['goal_max']:g}", "met" if g["met"] else "MISSED"]
            for g in goals]  # fmt: skip
    print(table(["benchmark", "ratio", "value", "goal", ""], rows))
    missed = [g for g in goals if not g["met"]]
    print(f"{len(goals) - len(missed)}/{len(goals)} goals met" + (f"; MISSED: {len(missed)}" if missed else ""))
    for note in notes:
        print("NOTE: " + note)
    print(f"wrote {out} in {wall:.1f} s")
    return report


if __name__ == "__main__":
    main()
