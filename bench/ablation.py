"""Ablations of the quickstart: without hypernetwork pretraining, without KL, without ΔW alignment, without fusion.

    python bench/ablation.py --out ablation.json                 # the held-out report, one run per variant
    python bench/ablation.py --validation 12 --out val.json      # on 12 left-out training tasks (for choosing settings)
    python bench/ablation.py --fast --out smoke.json             # smoke run
    python bench/ablation.py --seeds 0 1 2 --jobs 2 --threads 1  # every variant over three seeds: mean ± std

Each variant is the full quickstart (`peft_tagi.quickstart.run_quickstart`) with one change, in its own process;
`--jobs` runs several at once (each gets its share of the CPU threads). `--set key=value` changes the base config
of every variant (e.g. `--set learning_rate=3e-3`); `--variants` picks variants by name; `--seeds` repeats every
variant over seeds (the seed changes the task split's data, the initialisations and the data order), and the report
gives each row's mean ± std over seeds (sample std) next to the per-seed figures.
"""

from __future__ import annotations

import argparse
import ast
import json
import multiprocessing as mp
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

# The paper's full method (all three losses, fusion, hypernetwork pretraining), then one component removed. The
# quickstart's default is the "no_delta_alignment" variant (chosen on left-out training tasks).
FULL_METHOD = {"lambda_ins": "sigmoid"}
VARIANTS = {
    "quickstart": {},  # the quickstart's own default, as `peft-tagi quickstart` runs it
    "full": dict(FULL_METHOD),
    "no_hypernetwork_pretraining": {**FULL_METHOD, "pretrain_steps": 0},
    "no_kl": {**FULL_METHOD, "lambda_kl": 0.0},
    "no_delta_alignment": {**FULL_METHOD, "lambda_ins": 0.0},
    "no_fusion": {**FULL_METHOD, "instruction_fusion": False},
    # Not a removal: ΔW alignment to one parameter teacher per task instead of per category.
    "per_task_teachers": {**FULL_METHOD, "group_by": "task_name"},
}
REPORT_ROWS = ("base", "meta_teacher", "tagi", "tagi_plain_lora", "oracle")


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _run(name: str, overrides: dict, fast: bool, validation: int, out_dir: str, threads: int, seed: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from peft_tagi.quickstart import QuickstartConfig, run_quickstart

    config = QuickstartConfig.fast() if fast else QuickstartConfig()
    config = replace(config, validation_tasks=validation, seed=seed, **overrides)
    start = time.perf_counter()
    try:
        results = run_quickstart(Path(out_dir) / f"{name}-seed{seed}", config, overwrite=True)
    except (ValueError, FloatingPointError) as error:  # a diverged run is a result to report, not a crash
        return {"variant": name, "seed": seed, "overrides": overrides, "error": f"{type(error).__name__}: {error}"}
    return {
        "variant": name,
        "seed": seed,
        "overrides": overrides,
        "seconds": round(time.perf_counter() - start, 1),
        "timings_s": results["timings_s"],
        "rows": {row: {k: results["rows"][row][k] for k in ("rougeL", "exact_match")} for row in REPORT_ROWS},
        "instruction_swap": {k: v["rougeL"] for k, v in results["instruction_swap"].items()},
        "training_tasks": {
            k: {m: v[m] for m in ("rougeL", "exact_match")} for k, v in results["training_tasks"].items()
        },
        "evaluated_on": results["evaluated_on"],
    }


def run_jobs(
    variants: dict[str, dict], seeds: list[int], fast: bool, validation: int, work_dir: str, jobs: int, threads: int
) -> list[dict]:
    """Every (variant, seed) run of the quickstart, `jobs` processes side by side with `threads` torch threads each."""
    threads = threads or max(1, (os.cpu_count() or 2) // jobs)
    tasks = [
        (name, overrides, fast, validation, work_dir, threads, seed)
        for name, overrides in variants.items()
        for seed in seeds
    ]
    with mp.get_context("spawn").Pool(jobs) as pool:
        return pool.starmap(_run, tasks)


def aggregate(runs: list[dict]) -> dict[str, dict]:
    """Per variant: mean, sample std and per-seed values of every row's ROUGE-L and exact match; failed seeds listed."""
    summary: dict[str, dict] = {}
    for name in dict.fromkeys(r["variant"] for r in runs):
        done = [r for r in runs if r["variant"] == name and "rows" in r]
        entry = {"seeds": [r["seed"] for r in done], "failed": {r["seed"]: r["error"] for r in runs if r["variant"] == name and "error" in r}}  # fmt: skip
        for row in REPORT_ROWS:
            for metric in ("rougeL", "exact_match"):
                values = [r["rows"][row][metric] for r in done]
                entry.setdefault(row, {})[metric] = {
                    "mean": round(statistics.fmean(values), 2) if values else None,
                    "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
                    "per_seed": values,
                }
        summary[name] = entry
    return summary


def format_cell(cell: dict) -> str:
    return "failed" if cell["mean"] is None else f"{cell['mean']:.1f} ± {cell['std']:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="ablation.json")
    parser.add_argument("--work-dir", default="ablation-runs")
    parser.add_argument("--variants", nargs="+", default=[v for v in VARIANTS if v != "quickstart"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="QuickstartConfig overrides")
    parser.add_argument("--validation", type=int, default=0, help="evaluate on N left-out training tasks instead")
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per job (default: cores / jobs)")
    args = parser.parse_args()

    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"error: unknown variants {unknown}; choose from {list(VARIANTS)}.")
    base_overrides = dict(item.split("=", 1) for item in args.set)
    base_overrides = {key: _parse_value(value) for key, value in base_overrides.items()}
    variants = {name: {**base_overrides, **VARIANTS[name]} for name in args.variants}
    runs = run_jobs(variants, args.seeds, args.fast, args.validation, args.work_dir, args.jobs, args.threads)
    summary = aggregate(runs)

    evaluated_on = next((r["evaluated_on"] for r in runs if "evaluated_on" in r), "nothing (every run failed)")
    print(f"evaluated on: {evaluated_on}; seeds {args.seeds}  (overrides: {base_overrides or 'none'})")
    print(f"{'variant':<30} {'TAGI R-L':>13} {'TAGI EM':>13} {'teacher R-L':>13} {'base R-L':>13} {'oracle R-L':>13}")
    for name, entry in summary.items():
        cells = [entry["tagi"]["rougeL"], entry["tagi"]["exact_match"], entry["meta_teacher"]["rougeL"]]
        cells += [entry["base"]["rougeL"], entry["oracle"]["rougeL"]]
        print(f"{name:<30} " + " ".join(f"{format_cell(c):>13}" for c in cells))
        for seed, error in entry["failed"].items():
            print(f"  seed {seed} failed: {error}")
    report = {"overrides": base_overrides, "seeds": args.seeds, "summary": summary, "results": runs}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
