"""Do the generated adapters tell "a, then b" from "b, then a"? Distances between the ΔW a TAGI model writes.

    python -m bench.order_adapters RUN [RUN ...] --out order_adapters.json

Each RUN is a finished quickstart folder (`results.json`, `work/tagi`; a held-out or a validation run). For every
evaluated task whose steps also compose the other way round, and for every pair of training tasks that are each
other's reverse, the model's adapters (ΔW = scaling · B·A of every targeted module, concatenated) are compared:

- *other wording*: the same task in two of its canonical training wordings (how far a rewording moves the adapter);
- *steps swapped*: the same wording with its two steps the other way round (for a training pair: the reverse task,
  trained on as well);
- *other task*: two different tasks of the same set.

A hypernetwork that reads the order writes the swapped instruction an adapter as far from the original's as another
task's; one that reads only which steps are named writes nearly the same adapter (no farther than a rewording). No
training: seconds per run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

import torch


def delta_w(adapter) -> torch.Tensor:
    """Every targeted module's ΔW = scaling · B·A, flattened and concatenated (modules in name order)."""
    return torch.cat(
        [(adapter.lora_B[n] @ adapter.lora_A[n]).flatten() * adapter.scaling for n in sorted(adapter.lora_A)]
    )


def distances(model, tokenizer, tasks: list, reverse_of: dict) -> dict:
    """L2 distances between adapters: each of `tasks` (its first canonical wording) against its second canonical
    wording, against `reverse_of[task.name]` (the task with the two steps the other way round, in the same connective
    and phrasings; None: skipped) and against each other. Returns the means over tasks and the per-task figures."""
    from peft_tagi.pipeline import generate_adapters

    per_task, own = {}, {}
    for task in tasks:
        reverse = reverse_of.get(task.name)
        if reverse is None:
            continue
        wordings, reverse_wording = task.canonical_instructions()[:2], reverse.canonical_instructions()[0]
        adapters = generate_adapters(model, tokenizer, [*wordings, reverse_wording])
        first, second, other_order = (delta_w(adapters[w]) for w in (*wordings, reverse_wording))
        per_task[task.name] = {
            "instruction": wordings[0],
            "other_wording": (first - second).norm().item(),
            "steps_swapped": (first - other_order).norm().item(),
            "swapped_instruction": reverse_wording,
        }
        own[task.name] = first
    if not own:
        return {"tasks": 0}
    others = [(own[a] - own[b]).norm().item() for a, b in itertools.combinations(own, 2)]
    return {
        "tasks": len(own),
        "adapter_norm": statistics.fmean(v.norm().item() for v in own.values()),
        "other_wording": statistics.fmean(t["other_wording"] for t in per_task.values()),
        "steps_swapped": statistics.fmean(t["steps_swapped"] for t in per_task.values()),
        "other_task": statistics.fmean(others) if others else None,
        "per_task": per_task,
    }


def run_distances(folder: Path) -> dict:
    """`distances` for one finished quickstart folder: its evaluated tasks (held-out or left-out training tasks)
    against the same wording with the steps swapped, and the training tasks against their trained reverse."""
    from bench.readme_example import load_run
    from peft_tagi.data.synthetic import SyntheticSuite
    from peft_tagi.quickstart import split_tasks

    config, model, tokenizer = load_run(folder, validation=False)
    results = json.loads((folder / "results.json").read_text())
    suite = SyntheticSuite(seed=config["seed"])
    train_tasks, evaluated = split_tasks(suite, config["validation_tasks"])
    trained = {t.primitives: t for t in train_tasks}
    # The swapped wording of an evaluated task is its reverse composition in a training wording.
    swapped = {t.name: _reverse(suite, t) for t in evaluated}
    trained_reverse = {t.name: trained.get(t.primitives[::-1]) for t in train_tasks}
    return {
        "run": str(folder),
        "seed": config["seed"],
        "evaluated_on": results.get("evaluated_on"),
        "config": {
            k: config.get(k) for k in ("pooling", "pooling_queries", "instruction_fusion", "instruction_encoder")
        },
        "evaluated_tasks": distances(model, tokenizer, evaluated, swapped),
        "training_pairs": distances(model, tokenizer, train_tasks, trained_reverse),
    }


def _reverse(suite, task):
    """The task with `task`'s two steps the other way round, or None where they do not compose so."""
    try:
        return suite.compose(*task.primitives[::-1])
    except ValueError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished quickstart folders")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("order_adapters.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for folder in args.runs:
        if not (folder / "results.json").is_file() or not (folder / "work" / "tagi").is_dir():
            raise SystemExit(f"error: {folder} is not a finished quickstart folder (results.json and work/tagi).")
    with torch.no_grad():
        report = {"runs": [run_distances(folder) for folder in args.runs]}
    for run in report["runs"]:
        for part in ("evaluated_tasks", "training_pairs"):
            d = run[part]
            if d["tasks"]:
                print(
                    f"{run['run']} {part}: {d['tasks']} tasks, |ΔW| {d['adapter_norm']:.2f}; other wording "
                    f"{d['other_wording']:.2f}, steps swapped {d['steps_swapped']:.2f}, other task {d['other_task']:.2f}"
                )
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
