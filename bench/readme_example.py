"""Which instruction the README's `predict` example shows: chosen on validation runs, never on held-out tasks.

    python -m bench.readme_example RUN_DIR [RUN_DIR ...] --out readme_example.json

Each RUN_DIR is a finished validation run of the quickstart (`validation_tasks` > 0, e.g. the per-seed folders of
`python -m bench.ablation --validation 12 ...`): its models never saw its left-out tasks and it never touched the
held-out ones. For every task that each run trained on, TAGI answers `--inputs` unseen inputs of the task under its
first canonical training wording ("First ..., then ..."), the wording of the README's example. Prints and writes the
tasks ranked by their lowest exact match over the runs. The README then shows one of the top tasks, and
`bench/quality.py` checks its printed outputs on the default model's own runs (other models than these).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def task_scores(folder: Path, num_inputs: int) -> dict:
    """TAGI's exact match per trained task of one finished validation run, under the first canonical wording."""
    from peft_tagi.data.synthetic import SyntheticSuite
    from peft_tagi.pipeline import load_tagi_model, score, serve_by_instruction
    from peft_tagi.quickstart import GENERATION, split_tasks

    report = folder / "results.json"
    if not report.is_file():
        raise SystemExit(f"error: {folder} holds no finished quickstart ({report} is missing).")
    config = json.loads(report.read_text())["config"]
    if not config.get("validation_tasks"):
        raise SystemExit(f"error: {folder} is not a validation run; the example is not chosen on held-out tasks.")
    suite = SyntheticSuite(seed=config["seed"])
    trained, _ = split_tasks(suite, config["validation_tasks"])
    # Inputs from another stream than training ("eval" split), one wording per task: the README's.
    examples = [
        {**e, "instruction": task.canonical_instructions()[0]}
        for task in trained
        for e in suite.examples([task], num_inputs, split="eval", seed=config["seed"] + 1)
    ]
    model, tokenizer = load_tagi_model(folder / "work" / "base", folder / "work" / "tagi")
    model.eval()
    predictions = serve_by_instruction(model, tokenizer, examples, **GENERATION)
    per_task = score(predictions, examples)["per_task"]
    return {
        "run": str(folder),
        "seed": config["seed"],
        "exact_match": {task.name: per_task[task.name]["exact_match"] for task in trained},
        "instruction": {task.name: task.canonical_instructions()[0] for task in trained},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--inputs", type=int, default=16, help="inputs per task (default 16)")
    parser.add_argument("--out", default="readme_example.json")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    runs = [task_scores(folder, args.inputs) for folder in args.runs]
    # Tasks every run trained on, by their worst run: an example must be right on every seed's model.
    common = set.intersection(*(set(r["exact_match"]) for r in runs))
    ranked = sorted(
        (
            {
                "task": task,
                "instruction": runs[0]["instruction"][task],
                "lowest_exact_match": min(r["exact_match"][task] for r in runs),
                "per_run": [round(r["exact_match"][task], 1) for r in runs],
            }
            for task in common
        ),
        key=lambda entry: (-entry["lowest_exact_match"], entry["task"]),
    )
    print(f"TAGI exact match per trained task, {args.inputs} inputs each, lowest of {len(runs)} runs first:")
    for entry in ranked[:20]:
        print(f"  {entry['lowest_exact_match']:5.1f}  {entry['per_run']}  {entry['instruction']}")
    Path(args.out).write_text(json.dumps({"inputs_per_task": args.inputs, "runs": runs, "ranked": ranked}, indent=2))
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
