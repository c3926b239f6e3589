"""Which base model the embedded default should start from: architecture, size and pretraining, on validation.

    python -m bench.base_pretraining --seeds 0 1 2 --recipes t5 bart --jobs 2 --threads 1 \
        --out bench/results/base_recipes.json

For every (recipe, seed): make a base model by the recipe (`peft_tagi.embedded_base`: build it from random weights,
pretrain it on the suite's plain text), train stage `teachers` on the training tasks minus 12 left out for validation
(`validation_tasks=12`), and score the meta-train teacher (instruction + input) on those 12 left-out training tasks
(canonical wordings), on 12 tasks it trained on (unseen inputs), and with the left-out instructions read wrong: their
two steps asked in the other order (exact match against the requested and the original order) and their words
shuffled. Held-out tasks are never touched, so a recipe chosen from this is chosen on validation only. The teacher is
what TAGI distils from, and its score bounds TAGI's (docs/quality.md), at a fraction of the cost of the whole
pipeline. Runs of one seed share the suite split, the data and the initialisation seed; the difference to the first
recipe is taken per seed, with a 95 % t interval. Writes the JSON (per run, per recipe, paired differences).
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

from bench.ablation import mean_std, paired_interval

VALIDATION_TASKS = 12
# Base recipes (`EmbeddedBaseConfig` fields). "t5" is the quickstart's from-scratch base; the "t5-cut*" pair is the
# earlier comparison of where the demonstrations are cut (bench/results/base_pretraining.json); the others keep the
# split-independent text of a base shared by every seed (no two-step instructions).
RECIPES = {
    "t5": {"architecture": "t5"},
    "t5-cut0": {"architecture": "t5", "output_cut": 0.0},
    "t5-shared-text": {"architecture": "t5", "task_instructions": False},
    "bart": {"architecture": "bart", "task_instructions": False},
    "bart-wide": {"architecture": "bart", "task_instructions": False, "d_model": 192, "d_ff": 768},
    "bart-deep": {"architecture": "bart", "task_instructions": False, "num_layers": 4},
    "bart-cut1": {"architecture": "bart", "task_instructions": False, "output_cut": 1.0},
}
METRICS = ("rougeL", "exact_match")
SPLITS = ("validation", "trained_tasks", "step_order_requested", "step_order_original", "shuffled_words")


def run_one(recipe: str, seed: int, work_dir: str, threads: int, base_steps: int, teacher_steps: int) -> dict:
    """Make the base of `recipe` for `seed`, train the teachers, and score the meta-train teacher (see the module)."""
    import torch

    from peft_tagi.data.synthetic import SyntheticSuite, suite_tokenizer
    from peft_tagi.embedded_base import EmbeddedBaseConfig, build_base_model, pretrain_base, pretraining_corpus
    from peft_tagi.pipeline import generate_outputs, score, tagi_model, train_stage
    from peft_tagi.quickstart import QuickstartConfig, split_tasks, stage_arguments
    from peft_tagi.teachers import load_teachers

    torch.set_num_threads(threads)
    base_config = EmbeddedBaseConfig(
        seed=seed, base_steps=base_steps, num_texts=20000 if base_steps > 100 else 256, **RECIPES[recipe]
    )
    config = dataclasses.replace(
        QuickstartConfig(), seed=seed, validation_tasks=VALIDATION_TASKS, teacher_steps=teacher_steps
    )
    out = Path(work_dir) / f"{recipe}-seed{seed}"
    start = time.perf_counter()
    suite = SyntheticSuite(seed=seed)
    tokenizer = suite_tokenizer(suite)
    train_tasks, left_out = split_tasks(suite, VALIDATION_TASKS)
    model = build_base_model(len(tokenizer), base_config)
    losses = pretrain_base(model, tokenizer, pretraining_corpus(suite, base_config), base_config)
    base_seconds = time.perf_counter() - start
    model.save_pretrained(out / "base")
    torch.manual_seed(seed)
    model = tagi_model(
        type(model).from_pretrained(out / "base"),
        r=config.r,
        lora_alpha=config.lora_alpha,
        target_modules=list(base_config.target_modules),
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

    def evaluate(examples: list[dict], references: str = "references") -> dict:
        texts = [f"{e['instruction']}\n{e['input']}" for e in examples]
        predictions = generate_outputs(
            model, tokenizer, texts, lambda: tagi.apply_task_weights(weights), batch_size=64, max_new_tokens=16
        )
        scores = score(predictions, [{**e, "references": e[references]} for e in examples])
        return {metric: scores[metric] for metric in METRICS}

    left_out_examples = suite.examples(left_out, config.eval_instances, split="eval", seed=seed + 1)
    step_order = suite.step_order_examples(left_out_examples)
    return {
        "recipe": recipe,
        "seed": seed,
        "validation": evaluate(left_out_examples),
        "trained_tasks": evaluate(
            suite.examples(train_tasks[::8][:VALIDATION_TASKS], config.eval_instances, split="eval", seed=seed + 1)
        ),
        "step_order_requested": evaluate(step_order),
        "step_order_original": evaluate(step_order, references="own_references"),
        "shuffled_words": evaluate(suite.shuffled_instruction_examples(left_out_examples, seed=seed)),
        "base_final_loss": statistics.fmean(losses[-50:]),
        "base_seconds": round(base_seconds, 1),
        "seconds": round(time.perf_counter() - start, 1),
    }


def summarise(runs: list[dict]) -> dict:
    """Mean ± sample std per recipe, and each recipe minus the first one, paired by seed (95 % t interval)."""
    recipes = list(dict.fromkeys(r["recipe"] for r in runs))
    by = {(r["recipe"], r["seed"]): r for r in runs}
    summary: dict = {"per_recipe": {}, "minus_first_recipe": {}}
    for recipe in recipes:
        seeds = sorted(s for c, s in by if c == recipe)
        splits = [split for split in SPLITS if split in by[recipe, seeds[0]]]
        summary["per_recipe"][recipe] = {
            split: {metric: mean_std([by[recipe, s][split][metric] for s in seeds]) for metric in METRICS}
            for split in splits
        }
    for recipe in recipes[1:]:
        seeds = sorted(s for c, s in by if c == recipe and (recipes[0], s) in by)
        if len(seeds) < 2:
            continue
        entry = {}
        for split in ("validation", "trained_tasks"):
            for metric in METRICS:
                diffs = [by[recipe, s][split][metric] - by[recipes[0], s][split][metric] for s in seeds]
                entry[f"{split}/{metric}"] = paired_interval(diffs)
        summary["minus_first_recipe"][recipe] = entry
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--recipes", nargs="+", default=["t5", "bart"], choices=sorted(RECIPES))
    parser.add_argument("--base-steps", type=int, default=4000, help="pretraining steps of every base")
    parser.add_argument("--teacher-steps", type=int, default=750, help="steps of the teachers stage")
    parser.add_argument("--out", default="base_recipes.json")
    parser.add_argument("--work-dir", default="base-recipe-runs")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    args = parser.parse_args()
    start = time.perf_counter()
    jobs = [
        (recipe, seed, args.work_dir, args.threads, args.base_steps, args.teacher_steps)
        for seed in args.seeds
        for recipe in args.recipes
    ]
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        runs = pool.starmap(run_one, jobs, chunksize=1)
    report = {
        "command": " ".join(["python -m bench.base_pretraining", *sys.argv[1:]]),
        "recipes": {name: RECIPES[name] for name in args.recipes},
        "budget": {"base_steps": args.base_steps, "teacher_steps": args.teacher_steps},
        "validation_tasks": VALIDATION_TASKS,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "summary": summarise(runs),
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for recipe, entry in report["summary"]["per_recipe"].items():
        v, t = entry["validation"], entry["trained_tasks"]
        print(
            f"{recipe}: teacher on left-out training tasks {v['rougeL']['mean']:.1f} ± {v['rougeL']['std']:.1f} "
            f"ROUGE-L / {v['exact_match']['mean']:.1f} ± {v['exact_match']['std']:.1f} EM; on trained tasks "
            f"{t['rougeL']['mean']:.1f} / {t['exact_match']['mean']:.1f}; steps asked the other way: requested "
            f"{entry['step_order_requested']['exact_match']['mean']:.1f}, original "
            f"{entry['step_order_original']['exact_match']['mean']:.1f} EM; shuffled words "
            f"{entry['shuffled_words']['exact_match']['mean']:.1f} EM"
        )
    for recipe, entry in report["summary"]["minus_first_recipe"].items():
        d = entry["validation/exact_match"]
        print(f"{recipe} minus {args.recipes[0]}: {d['mean']:+.1f} EM on left-out tasks, 95 % interval {d['ci95']}")


if __name__ == "__main__":
    main()
