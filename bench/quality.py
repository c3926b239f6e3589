"""The quickstart's quality over several seeds: mean ± std of every row, the per-seed rows, and the quality bar.

    python -m bench.quality --seeds 0 1 2 --jobs 2 --threads 1 --out bench/results/quality.json
    python -m bench.quality --seeds 0 1 2 --set base_model=embedded --out bench/results/quality_embedded_base.json

Each seed is the whole `peft-tagi quickstart --seed N` (its own process; `--jobs` side by side, each with `--threads`
torch threads: on 2 cores two one-thread jobs finish sooner in wall time than one two-thread job after another).
Writes the JSON (summary, per-seed results, the quality bar per seed and on the mean) and a PNG with error bars next
to it. A seed whose run stops (e.g. a diverged hypernetwork) is reported as failed, not dropped silently.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from bench.ablation import REPORT_ROWS, VARIANTS, aggregate, format_cell, mean_std, parse_value, run_jobs

# The project's quality bar for the embedded default: TAGI well above the frozen base and close to its teacher.
MIN_GAIN_OVER_BASE = 15.0  # ROUGE-L points
MIN_FRACTION_OF_TEACHER = 0.8
# Exact match, the measure that shows whether the steps were carried out: the goal on the mean and on every seed.
EXACT_MATCH_GOAL_MEAN = 50.0
EXACT_MATCH_GOAL_EACH = 40.0


def instruction_reading(runs: list[dict]) -> dict:
    """Mean ± std over seeds of the step-order and shuffled-word controls (exact match), for TAGI and the teacher,
    with the quickstart's goals (`peft_tagi.quickstart.instruction_reading`) judged on the means."""
    from peft_tagi.quickstart import instruction_reading as judge_reading

    done = [r for r in runs if "step_order" in r]
    if not done:
        return {"tagi": {}, "meta_teacher": {}}
    out, means = {}, {"step_order": {}, "shuffled_words": {}}
    for name in ("tagi", "meta_teacher"):
        out[name] = {
            "step_order_requested": mean_std([r["step_order"][name]["requested"]["exact_match"] for r in done]),
            "step_order_original": mean_std([r["step_order"][name]["original"]["exact_match"] for r in done]),
            "shuffled_words": mean_std([r["shuffled_words"][name]["exact_match"] for r in done]),
            "real_instructions": mean_std([r["rows"][name]["exact_match"] for r in done]),
        }
        means["step_order"][name] = {
            order: {"exact_match": out[name][f"step_order_{order}"]["mean"]} for order in ("requested", "original")
        }
        means["shuffled_words"][name] = {"exact_match": out[name]["shuffled_words"]["mean"]}
        means[name] = {"exact_match": out[name]["real_instructions"]["mean"]}
    for name, goals in judge_reading(means).items():
        out[name]["goals_on_the_mean"] = goals
    return out


def predict_example(folder: Path) -> dict:
    """`peft-tagi predict` with the README's example on one finished run's model, in a fresh process."""
    from peft_tagi.predict import QUICKSTART_EXAMPLES

    instruction, inputs, expected = QUICKSTART_EXAMPLES[0]
    command = [sys.executable, "-m", "peft_tagi.cli", "predict", "--model", str(folder / "work" / "base"), "--tagi",
               str(folder / "work" / "tagi"), "--instruction", instruction]  # fmt: skip
    for text in inputs:
        command += ["--input", text]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    outputs = proc.stdout.splitlines()
    return {
        "instruction": instruction,
        "inputs": list(inputs),
        "outputs": outputs,
        "expected": list(expected),
        "correct": [o == e for o, e in zip(outputs, expected)] if proc.returncode == 0 else [],
        **({"error": proc.stderr[-2000:]} if proc.returncode else {}),
    }


def quality_bar(rows: dict[str, float]) -> dict:
    """rows: ROUGE-L of `base`, `meta_teacher`, `tagi` -> the two checks and whether both hold."""
    gain = rows["tagi"] - rows["base"]
    fraction = rows["tagi"] / rows["meta_teacher"] if rows["meta_teacher"] else 0.0
    return {
        "gain_over_base": round(gain, 2),
        "fraction_of_teacher": round(fraction, 3),
        "met": gain >= MIN_GAIN_OVER_BASE and fraction >= MIN_FRACTION_OF_TEACHER,
    }


def plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from peft_tagi.quickstart import ROWS

    labels = dict(ROWS)
    fig, ax = plt.subplots(figsize=(9, 4))
    x = range(len(REPORT_ROWS))
    for offset, metric, name in ((-0.2, "rougeL", "ROUGE-L"), (0.2, "exact_match", "exact match")):
        means = [summary[row][metric]["mean"] or 0.0 for row in REPORT_ROWS]
        stds = [summary[row][metric]["std"] for row in REPORT_ROWS]
        ax.bar([i + offset for i in x], means, width=0.4, yerr=stds, capsize=3, label=f"{name} (mean ± std)")
    ax.set_xticks(list(x))
    ax.set_xticklabels([textwrap.fill(labels[row], 24) for row in REPORT_ROWS], fontsize=7)
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default="quality.json")
    parser.add_argument("--work-dir", default="quality-runs")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="QuickstartConfig overrides")
    parser.add_argument("--validation", type=int, default=0, help="evaluate on N left-out training tasks instead")
    parser.add_argument("--fast", action="store_true", help="smoke run of every seed")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    args = parser.parse_args()

    overrides = {k: parse_value(v) for k, v in (item.split("=", 1) for item in args.set)}
    start = time.perf_counter()
    runs = run_jobs(
        {"quickstart": {**VARIANTS["quickstart"], **overrides}},
        args.seeds,
        args.fast,
        args.validation,
        args.work_dir,
        args.jobs,
        args.threads,
        share_stages=False,  # one variant: nothing to share, and every seed's timings are a whole run's
    )
    wall = round(time.perf_counter() - start, 1)
    summary = aggregate(runs)["quickstart"]
    per_seed_bar = {
        r["seed"]: quality_bar({row: r["rows"][row]["rougeL"] for row in REPORT_ROWS}) for r in runs if "rows" in r
    }
    mean_bar = (
        quality_bar({row: summary[row]["rougeL"]["mean"] or 0.0 for row in REPORT_ROWS}) if per_seed_bar else None
    )
    bar_holds = bool(per_seed_bar) and mean_bar["met"] and all(b["met"] for b in per_seed_bar.values())

    done = [r for r in runs if "rows" in r]
    tagi_em = [r["rows"]["tagi"]["exact_match"] for r in done]
    exact_match = {
        "tagi": mean_std(tagi_em),
        "goal_mean": EXACT_MATCH_GOAL_MEAN,
        "goal_each_seed": EXACT_MATCH_GOAL_EACH,
        "met": bool(tagi_em)
        and statistics.fmean(tagi_em) >= EXACT_MATCH_GOAL_MEAN
        and min(tagi_em) >= EXACT_MATCH_GOAL_EACH,
    }
    reading = instruction_reading(runs)
    examples = {r["seed"]: predict_example(Path(args.work_dir) / f"quickstart-seed{r['seed']}") for r in done}

    evaluated_on = next((r["evaluated_on"] for r in runs if "evaluated_on" in r), "nothing (every run failed)")
    print(f"quickstart over seeds {args.seeds} ({evaluated_on}); {wall:.0f} s wall, {args.jobs} jobs")
    print(f"{'row':<20} {'ROUGE-L':>13} {'exact match':>13}   per-seed ROUGE-L")
    for row in REPORT_ROWS:
        cells = summary[row]
        per_seed = ", ".join(f"{v:.1f}" for v in cells["rougeL"]["per_seed"])
        print(f"{row:<20} {format_cell(cells['rougeL']):>13} {format_cell(cells['exact_match']):>13}   {per_seed}")
    for seed, error in summary["failed"].items():
        print(f"seed {seed} failed: {error}")
    for seed, bar in per_seed_bar.items():
        print(
            f"seed {seed}: TAGI − base {bar['gain_over_base']:+.1f}, TAGI / teacher {bar['fraction_of_teacher']:.0%}"
        )
    if mean_bar:
        print(
            f"mean: TAGI − base {mean_bar['gain_over_base']:+.1f}, TAGI / teacher {mean_bar['fraction_of_teacher']:.0%}"
        )
    print(
        f"quality bar (TAGI ≥ base + {MIN_GAIN_OVER_BASE:.0f} ROUGE-L and ≥ {MIN_FRACTION_OF_TEACHER:.0%} of the "
        f"teacher, on the mean and on every seed): {'met' if bar_holds else 'NOT met'}"
    )
    print(
        f"exact match (TAGI ≥ {EXACT_MATCH_GOAL_MEAN:.0f} on the mean, ≥ {EXACT_MATCH_GOAL_EACH:.0f} on every seed): "
        f"{format_cell(exact_match['tagi'])}, {'met' if exact_match['met'] else 'NOT met'}"
    )
    for name, entry in reading.items():
        if entry:
            verdicts = {True: "met", False: "NOT met", None: "no reference (0 EM)"}
            goals = ", ".join(f"{k} {verdicts[v['met']]}" for k, v in entry["goals_on_the_mean"].items())
            print(
                f"{name} reads the instruction (exact match, mean): steps asked the other way: requested order "
                f"{entry['step_order_requested']['mean']:.1f}, original {entry['step_order_original']['mean']:.1f}; "
                f"shuffled words {entry['shuffled_words']['mean']:.1f} against {entry['real_instructions']['mean']:.1f}; "
                f"goals: {goals}"
            )
    for seed, example in examples.items():
        print(
            f"seed {seed}: peft-tagi predict {example['instruction']!r} -> {example['outputs']} (correct: {example['correct']})"
        )

    out = Path(args.out)
    report = {
        "seeds": args.seeds,
        "overrides": overrides,
        "evaluated_on": evaluated_on,
        "wall_seconds": wall,
        "jobs": args.jobs,
        "threads_per_job": args.threads,
        "summary": summary,
        "quality_bar": {"per_seed": per_seed_bar, "mean": mean_bar, "met": bar_holds},
        "exact_match": exact_match,
        "instruction_reading": reading,
        "predict_example": examples,
        "results": runs,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(summary, out.with_suffix(".png"), f"quickstart, {evaluated_on}, seeds {args.seeds}: mean ± std")
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
