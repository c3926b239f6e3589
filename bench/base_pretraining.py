"""How the base model's pretraining shapes the teachers: demonstrations cut at "output:" or at random words.

    python -m bench.base_pretraining --seeds 0 1 2 --cuts 0 0.5 --jobs 2 --threads 1 --out bench/results/base_pretraining.json

For every (cut, seed): pretrain the quickstart's small T5 (`peft_tagi.embedded_base.pretrain_base(..., output_cut=cut)`), train stage
`teachers` on the training tasks minus 12 left out for validation (`validation_tasks=12`), and score the meta-train
teacher (instruction + input) on those 12 left-out training tasks (canonical wordings) and on 12 tasks it trained on
(unseen inputs). Held-out tasks are never touched, so a setting chosen from this is chosen on validation only. The
teacher is what TAGI distils from: TAGI's score follows it (README, "Ablation"), at a fraction of the cost of the whole
pipeline. Runs of one seed share data and initialisation; the difference to the first cut is taken per seed, with a
95 % t interval. Writes the JSON (per run, per cut, paired differences).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

from bench.ablation import paired_interval

VALIDATION_TASKS = 12
# A budget below the default run's (base 1500 / teachers 750), the same for every cut.
BUDGET = {"base_steps": 1000, "teacher_steps": 600}


def run_one(cut: float, seed: int, work_dir: str, threads: int, fast: bool) -> dict:
    """Pretrain the base with demonstrations cut at "output:" with probability `cut`, train the teachers, and score
    the meta-train teacher on the left-out and on trained tasks."""
    import torch

    from peft_tagi.data.synthetic import SyntheticSuite, suite_tokenizer
    from peft_tagi.embedded_base import build_base_model, demonstration_texts, pretrain_base
    from peft_tagi.pipeline import generate_outputs, score, tagi_model, train_stage
    from peft_tagi.quickstart import QuickstartConfig, split_tasks, stage_arguments
    from peft_tagi.teachers import load_teachers

    torch.set_num_threads(threads)
    base = QuickstartConfig.fast() if fast else QuickstartConfig()
    config = dataclasses.replace(base, seed=seed, validation_tasks=VALIDATION_TASKS, **({} if fast else BUDGET))
    out = Path(work_dir) / f"cut{cut}-seed{seed}"
    start = time.perf_counter()
    suite = SyntheticSuite(seed=seed)
    tokenizer = suite_tokenizer(suite)
    train_tasks, left_out = split_tasks(suite, VALIDATION_TASKS)
    n_texts = 20000 if not fast else 256
    texts = suite.pretraining_texts(n_texts, seed=seed) + demonstration_texts(suite, n_texts, seed)
    model = build_base_model(len(tokenizer), config.base())
    losses = pretrain_base(model, tokenizer, texts, config.base(), output_cut=cut)
    model.save_pretrained(out / "base")
    torch.manual_seed(seed)
    model = tagi_model(
        type(model).from_pretrained(out / "base"),
        r=config.r,
        lora_alpha=config.lora_alpha,
        target_modules=list(config.target_modules),
    )
    train = suite.examples(train_tasks, config.train_instances, split="train", seed=seed)
    args = stage_arguments(
        out, "teachers", config.teacher_steps, config, group_by="category", overwrite_teachers=True, disable_tqdm=True
    )
    train_stage(model, tokenizer, args, train)
    meta, _, _ = load_teachers(out / "teachers" / "teachers")
    tagi = model.base_model
    model.eval()
    weights = tagi.task_weights_from_adapter(meta, fusion=False)

    def evaluate(tasks) -> dict:
        examples = suite.examples(tasks, config.eval_instances, split="eval", seed=seed + 1)
        texts = [f"{e['instruction']}\n{e['input']}" for e in examples]
        predictions = generate_outputs(
            model, tokenizer, texts, lambda: tagi.apply_task_weights(weights), batch_size=64, max_new_tokens=16
        )
        scores = score(predictions, examples)
        return {"rougeL": scores["rougeL"], "exact_match": scores["exact_match"]}

    return {
        "cut": cut,
        "seed": seed,
        "validation": evaluate(left_out),
        "trained_tasks": evaluate(train_tasks[::8][:VALIDATION_TASKS]),
        "base_final_loss": statistics.fmean(losses[-50:]),
        "seconds": round(time.perf_counter() - start, 1),
    }


def summarise(runs: list[dict]) -> dict:
    """Mean ± sample std per cut, and each cut minus the first one, paired by seed (95 % t interval)."""
    cuts = list(dict.fromkeys(r["cut"] for r in runs))
    by = {(r["cut"], r["seed"]): r for r in runs}
    summary: dict = {"per_cut": {}, "minus_first_cut": {}}
    for cut in cuts:
        seeds = sorted(s for c, s in by if c == cut)
        summary["per_cut"][str(cut)] = {
            split: {
                metric: {
                    "mean": round(statistics.fmean(by[cut, s][split][metric] for s in seeds), 2),
                    "std": round(statistics.stdev(by[cut, s][split][metric] for s in seeds), 2) if len(seeds) > 1 else 0.0,
                    "per_seed": [round(by[cut, s][split][metric], 2) for s in seeds],
                }
                for metric in ("rougeL", "exact_match")
            }
            for split in ("validation", "trained_tasks")
        }  # fmt: skip
    for cut in cuts[1:]:
        seeds = sorted(s for c, s in by if c == cut and (cuts[0], s) in by)
        if len(seeds) < 2:
            continue
        entry = {}
        for split in ("validation", "trained_tasks"):
            for metric in ("rougeL", "exact_match"):
                diffs = [by[cut, s][split][metric] - by[cuts[0], s][split][metric] for s in seeds]
                entry[f"{split}/{metric}"] = paired_interval(diffs)
        summary["minus_first_cut"][str(cut)] = entry
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--cuts", nargs="+", type=float, default=[0.0, 0.5])
    parser.add_argument("--out", default="base_pretraining.json")
    parser.add_argument("--work-dir", default="base-pretraining-runs")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    parser.add_argument("--fast", action="store_true", help="smoke run (tiny budgets)")
    args = parser.parse_args()
    for cut in args.cuts:
        if not 0.0 <= cut <= 1.0:
            parser.error(f"--cuts are fractions of the demonstrations, between 0 and 1; got {cut}.")
    start = time.perf_counter()
    jobs = [(cut, seed, args.work_dir, args.threads, args.fast) for seed in args.seeds for cut in args.cuts]
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        runs = pool.starmap(run_one, jobs, chunksize=1)
    report = {
        "command": " ".join(sys.argv),
        "budget": BUDGET,
        "validation_tasks": VALIDATION_TASKS,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "summary": summarise(runs),
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for cut, entry in report["summary"]["per_cut"].items():
        v, t = entry["validation"], entry["trained_tasks"]
        print(
            f"cut {cut}: teacher on left-out training tasks {v['rougeL']['mean']:.1f} ± {v['rougeL']['std']:.1f} ROUGE-L "
            f"/ {v['exact_match']['mean']:.1f} EM; on trained tasks {t['rougeL']['mean']:.1f} / {t['exact_match']['mean']:.1f}"
        )
    for cut, entry in report["summary"]["minus_first_cut"].items():
        d = entry["validation/rougeL"]
        print(f"cut {cut} minus cut {args.cuts[0]}: {d['mean']:+.1f} ROUGE-L, 95 % interval {d['ci95']}")


if __name__ == "__main__":
    main()
