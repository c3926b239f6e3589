"""Does the instruction encoder itself tell the steps apart when they are worded in new words?

    python -m bench.encoder_neighbours --quality bench/results/quality_minilm.json --out bench/results/encoder_neighbours.json

The open-vocabulary family (`OPEN_VOCABULARY_PHRASINGS`) words every step in synonyms the training wordings never
use. The hypernetwork can only map such a wording to the right adapter if the encoder places it nearer to its own
step's training phrasings than to another step's. This measures that, with no training: every phrasing is embedded
by the encoder (`InstructionEncoder.embed`: mean-pooled token states, as the hypernetwork pools them), and each
open-vocabulary phrasing (and, as the control, each in-vocabulary evaluation phrasing) is assigned the step of its
nearest training phrasing by cosine similarity. A step it assigns wrongly is a limit of the encoder, not of TAGI.

With `--quality` (a `bench.quality` JSON of a run with that encoder), the held-out tasks' open-vocabulary scores are
split by whether both of their steps are assigned rightly, against the same tasks in training wordings: how much of
the open-vocabulary gap the encoder's confusions account for.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch.nn.functional as F


def nearest_steps(encoder_name: str) -> dict:
    """Each open-vocabulary and in-vocabulary evaluation phrasing -> the step of its nearest training phrasing."""
    from peft_tagi.data.synthetic import OPEN_VOCABULARY_PHRASINGS, PRIMITIVES
    from peft_tagi.instruction_encoder import InstructionEncoder

    encoder = InstructionEncoder(encoder_name).load()
    training = [(step.name, text) for step in PRIMITIVES for text in step.phrasings]
    keys = F.normalize(encoder.embed([text for _, text in training]), dim=-1)

    def assign(text: str, step: str) -> dict:
        similarity = (F.normalize(encoder.embed([text]), dim=-1) @ keys.T)[0]
        best = int(similarity.argmax())
        own = max(float(s) for (name, _), s in zip(training, similarity) if name == step)
        other = max(float(s) for (name, _), s in zip(training, similarity) if name != step)
        return {
            "text": text,
            "nearest_step": training[best][0],
            "nearest_phrasing": training[best][1],
            "right": training[best][0] == step,
            "margin": round(own - other, 4),  # > 0: the own step's best phrasing is the nearer one
        }

    open_vocabulary = {step.name: assign(OPEN_VOCABULARY_PHRASINGS[step.name], step.name) for step in PRIMITIVES}
    in_vocabulary = {step.name: [assign(text, step.name) for text in step.eval_phrasings] for step in PRIMITIVES}
    return {
        "encoder": encoder.name,
        "open_vocabulary": open_vocabulary,
        "open_vocabulary_right": sum(a["right"] for a in open_vocabulary.values()),
        "in_vocabulary_right": sum(a["right"] for rows in in_vocabulary.values() for a in rows),
        "steps": len(PRIMITIVES),
        "in_vocabulary_phrasings": sum(len(rows) for rows in in_vocabulary.values()),
        "in_vocabulary": in_vocabulary,
    }


def split_by_assignment(quality: dict, open_vocabulary: dict) -> dict:
    """Held-out open-vocabulary scores (per task, pooled over seeds) for tasks whose two steps the encoder assigns
    rightly against tasks with a wrongly assigned step, each next to the same tasks in training wordings."""
    from peft_tagi.data.synthetic import SyntheticSuite

    suite = SyntheticSuite()  # every seed's suite holds every two-step task, trained or held out

    groups: dict[str, dict[str, list[float]]] = {}
    for run in quality["results"]:
        report = run.get("open_vocabulary")
        if not report:
            continue
        for task, row in report["tagi"]["per_task"].items():
            right = all(open_vocabulary[step]["right"] for step in suite.task(task).primitives)
            group = groups.setdefault("both steps assigned rightly" if right else "a step assigned wrongly", {})
            reference = report["training_wordings"]["per_task"][task]
            for metric in ("rougeL", "exact_match"):
                group.setdefault(f"open_{metric}", []).append(row[metric])
                group.setdefault(f"training_{metric}", []).append(reference[metric])
    out = {}
    for name, values in groups.items():
        entry = {"task_runs": len(values["open_rougeL"])}
        for metric in ("rougeL", "exact_match"):
            open_mean = sum(values[f"open_{metric}"]) / len(values[f"open_{metric}"])
            training_mean = sum(values[f"training_{metric}"]) / len(values[f"training_{metric}"])
            entry[metric] = {
                "open_vocabulary": round(open_mean, 2),
                "training_wordings": round(training_mean, 2),
                "fraction": round(open_mean / training_mean, 3) if training_mean else None,
            }
        out[name] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", default="minilm", help="a Hub id, local folder or alias (default: minilm)")
    parser.add_argument("--quality", type=Path, help="a bench.quality JSON of runs with this encoder")
    parser.add_argument("--out", type=Path, default=Path("encoder_neighbours.json"))
    args = parser.parse_args()

    result = nearest_steps(args.encoder)
    print(f"encoder {result['encoder']}: the nearest training phrasing is of the right step for")
    print(f"  {result['open_vocabulary_right']} of {result['steps']} open-vocabulary phrasings")
    print(
        f"  {result['in_vocabulary_right']} of {result['in_vocabulary_phrasings']} in-vocabulary evaluation phrasings"
    )
    for step, entry in result["open_vocabulary"].items():
        mark = "right" if entry["right"] else f"WRONG: nearest is {entry['nearest_step']}"
        print(
            f"  {step:<13} {entry['text']!r:<62} margin {entry['margin']:+.3f}  {mark} ({entry['nearest_phrasing']!r})"
        )
    if args.quality is not None:
        quality = json.loads(args.quality.read_text())
        result["quality"] = str(args.quality)
        result["held_out_by_assignment"] = split_by_assignment(quality, result["open_vocabulary"])
        print("held-out open-vocabulary scores (per task over seeds) against the same tasks in training wordings:")
        for name, entry in result["held_out_by_assignment"].items():
            cells = [
                f"{m} {entry[m]['open_vocabulary']:.1f} / {entry[m]['training_wordings']:.1f} ({entry[m]['fraction']})"
                for m in ("rougeL", "exact_match")
            ]
            print(f"  {name:<28} {entry['task_runs']:>3} task-runs   " + "   ".join(cells))
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
