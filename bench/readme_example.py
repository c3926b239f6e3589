"""Which instruction the README's `predict` example shows: chosen on validation runs, never on held-out tasks.

    python -m bench.readme_example RUN_DIR [RUN_DIR ...] --out readme_example.json

Each RUN_DIR is a finished validation run of the quickstart (`validation_tasks` > 0, e.g. the per-seed folders of
`python -m bench.ablation --validation 12 ...`): its models never saw its left-out tasks and it never touched the
held-out ones. For every task that each run trained on, TAGI answers `--inputs` unseen inputs of the task under its
first canonical training wording ("First ..., then ..."), the wording of the README's example. Prints and writes the
tasks ranked by their lowest exact match over the runs. The example is the top task whose answers differ between
inputs (not one that always answers "2"), or `--task`; its inputs are chosen among those every run answers right:
the task's inputs of every run are served on every run, and the ones right everywhere are printed and written. The
task is right on most inputs, not all (see the ranking), so `--also-right-on` can add the default model's own runs
(other models than these, e.g. the held-out runs of `bench/quality.py`): the inputs must then be right there too,
which makes the README's example one that those runs print right, chosen so, and says nothing more about the task.
`bench/quality.py` records what the default's own runs print for it.

    python -m bench.readme_example VAL_RUN... --also-right-on HELDOUT_RUN... --out readme_example.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_run(folder: Path, validation: bool = True) -> tuple[dict, object, object]:
    """(config, TAGI model, tokenizer) of one finished run; with `validation`, refuses a held-out run. The base model
    is the run's own `work/base`, or, for a run that loaded its base from another (an ablation variant's
    `reuse_from`), the one its TAGI checkpoint names."""
    from peft_tagi.pipeline import load_tagi_model

    report = folder / "results.json"
    if not report.is_file():
        raise SystemExit(f"error: {folder} holds no finished quickstart ({report} is missing).")
    config = json.loads(report.read_text())["config"]
    if validation and not config.get("validation_tasks"):
        raise SystemExit(f"error: {folder} is not a validation run; the example is not chosen on held-out tasks.")
    checkpoint, base = folder / "work" / "tagi", folder / "work" / "base"
    if not base.is_dir():
        base = json.loads((checkpoint / "adapter_config.json").read_text())["base_model_name_or_path"]
    model, tokenizer = load_tagi_model(base, checkpoint)
    return config, model.eval(), tokenizer


def task_examples(config: dict, num_inputs: int) -> dict[str, list[dict]]:
    """Per task the run trained on: `num_inputs` examples from another stream than training ("eval" split), under
    the task's first canonical wording (the README's)."""
    from peft_tagi.data.synthetic import SyntheticSuite
    from peft_tagi.quickstart import split_tasks

    suite = SyntheticSuite(seed=config["seed"])
    trained, _ = split_tasks(suite, config["validation_tasks"])
    return {
        task.name: [
            {**e, "instruction": task.canonical_instructions()[0]}
            for e in suite.examples([task], num_inputs, split="eval", seed=config["seed"] + 1)
        ]
        for task in trained
    }


def task_scores(folder: Path, config: dict, model, tokenizer, examples: dict[str, list[dict]]) -> dict:
    """TAGI's exact match per trained task of one finished validation run, under the first canonical wording."""
    from peft_tagi.pipeline import score, serve_by_instruction
    from peft_tagi.quickstart import GENERATION

    flat = [e for rows in examples.values() for e in rows]
    per_task = score(serve_by_instruction(model, tokenizer, flat, **GENERATION), flat)["per_task"]
    return {
        "run": str(folder),
        "seed": config["seed"],
        "exact_match": {task: per_task[task]["exact_match"] for task in examples},
        "instruction": {task: rows[0]["instruction"] for task, rows in examples.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--inputs", type=int, default=16, help="inputs per task (default 16)")
    parser.add_argument("--out", default="readme_example.json")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--task", help="the example's task (default: the top task whose answers differ by input)")
    parser.add_argument(
        "--also-right-on",
        nargs="*",
        type=Path,
        default=[],
        metavar="RUN_DIR",
        help="finished runs of the default itself (e.g. the held-out runs of seeds 0-4) on which the example's inputs "
        "must be right too; the task is still chosen on the validation runs alone",
    )
    args = parser.parse_args()
    import torch

    from peft_tagi.pipeline import serve_by_instruction
    from peft_tagi.quickstart import GENERATION

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = [load_run(folder) for folder in args.runs]
    examples = [task_examples(config, args.inputs) for config, _, _ in loaded]
    runs = [task_scores(f, *run, ex) for f, run, ex in zip(args.runs, loaded, examples)]
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

    if args.task is not None and args.task not in common:
        raise SystemExit(f"error: --task {args.task!r} is not a task every run trained on.")
    varied = [e["task"] for e in ranked if len({x["output"] for x in examples[0][e["task"]]}) > 1]
    if not (args.task or varied):
        raise SystemExit("error: every task's inputs have one answer in these runs; name the example's task (--task).")
    task = args.task or varied[0]
    instruction = runs[0]["instruction"][task]
    # Every run's inputs of the task, served on every run (one batch each, as `predict` serves its inputs).
    candidates = {x["input"]: x["output"] for per_run in examples for x in per_run[task]}
    answers = []
    models = [(run[1], run[2], folder) for run, folder in zip(loaded, args.runs)]
    models += [(*load_run(folder, validation=False)[1:], folder) for folder in args.also_right_on]
    for model, tokenizer, folder in models:
        rows = [{"instruction": instruction, "input": text} for text in candidates]
        outputs = serve_by_instruction(model, tokenizer, rows, **GENERATION)
        answers.append({"run": str(folder), "outputs": dict(zip(candidates, outputs))})
    right_everywhere = [text for text in candidates if all(a["outputs"][text] == candidates[text] for a in answers)]
    print(f"example: {instruction!r}; of its {len(candidates)} inputs, every run answers right ({len(answers)} runs):")
    for text in right_everywhere:
        print(f"  {text!r} -> {candidates[text]!r}")
    example = {
        "task": task,
        "instruction": instruction,
        "inputs": [{"input": text, "reference": ref} for text, ref in candidates.items()],
        "outputs_per_run": answers,
        "validation_runs": [str(f) for f in args.runs],
        "also_right_on": [str(f) for f in args.also_right_on],
        "right_on_every_run": right_everywhere,
    }
    report = {"inputs_per_task": args.inputs, "runs": runs, "ranked": ranked, "example": example}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
