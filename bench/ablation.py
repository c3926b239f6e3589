"""Ablations of the quickstart: without hypernetwork pretraining, without KL, without ΔW alignment, without fusion.

    python bench/ablation.py --out ablation.json                 # the held-out report, one run per variant
    python bench/ablation.py --validation 12 --out val.json      # on 12 left-out training tasks (for choosing settings)
    python bench/ablation.py --fast --out smoke.json             # smoke run

Each variant is the full quickstart (`peft_tagi.quickstart.run_quickstart`) with one change, in its own process;
`--jobs` runs several at once (each gets its share of the CPU threads). `--set key=value` changes the base config
of every variant (e.g. `--set learning_rate=3e-3`); `--variants` picks variants by name.
"""

from __future__ import annotations

import argparse
import ast
import json
import multiprocessing as mp
import os
import time
from dataclasses import replace
from pathlib import Path

# The paper's full method (all three losses, fusion, hypernetwork pretraining), then one component removed. The
# quickstart's default is the "no_delta_alignment" variant (chosen on left-out training tasks).
FULL_METHOD = {"lambda_ins": "sigmoid"}
VARIANTS = {
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


def _run(name: str, overrides: dict, fast: bool, validation: int, out_dir: str, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from peft_tagi.quickstart import QuickstartConfig, run_quickstart

    config = QuickstartConfig.fast() if fast else QuickstartConfig()
    config = replace(config, validation_tasks=validation, **overrides)
    start = time.perf_counter()
    results = run_quickstart(Path(out_dir) / name, config, overwrite=True)
    return {
        "variant": name,
        "overrides": overrides,
        "seconds": round(time.perf_counter() - start, 1),
        "rows": {row: {k: results["rows"][row][k] for k in ("rougeL", "exact_match")} for row in REPORT_ROWS},
        "evaluated_on": results["evaluated_on"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="ablation.json")
    parser.add_argument("--work-dir", default="ablation-runs")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"from {list(VARIANTS)}")
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
    threads = args.threads or max(1, (os.cpu_count() or 2) // args.jobs)
    jobs = [
        (name, {**base_overrides, **VARIANTS[name]}, args.fast, args.validation, args.work_dir, threads)
        for name in args.variants
    ]
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        results = pool.starmap(_run, jobs)

    header = f"{'variant':<30} {'TAGI R-L':>9} {'TAGI EM':>8} {'teacher R-L':>12} {'base R-L':>9} {'oracle R-L':>11}"
    print(f"evaluated on: {results[0]['evaluated_on']}  (overrides: {base_overrides or 'none'})")
    print(header)
    for r in results:
        rows = r["rows"]
        print(
            f"{r['variant']:<30} {rows['tagi']['rougeL']:>9.1f} {rows['tagi']['exact_match']:>8.1f} "
            f"{rows['meta_teacher']['rougeL']:>12.1f} {rows['base']['rougeL']:>9.1f} {rows['oracle']['rougeL']:>11.1f}"
        )
    Path(args.out).write_text(json.dumps({"overrides": base_overrides, "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
