"""Robustness to wording: TAGI's held-out score per evaluation-only paraphrase family, against the same examples in
training wordings, for finished quickstart runs. Re-evaluates the saved models (trains nothing).

    python -m bench.wording RUN_DIR [RUN_DIR ...] --out wording.json

Each RUN_DIR is a finished `peft-tagi quickstart` output folder (holding `results.json` and `work/{base,tagi}`), e.g.
the per-seed folders of `bench/quality.py`. The examples are those of the quickstart's held-out report (its seed and
`eval_instances`; the three families in turn, see `SyntheticSuite.examples`); the reference is the same inputs under
the tasks' canonical training wordings. Prints and writes per run and mean ± std over runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def evaluate_run(folder: Path) -> dict:
    """Re-evaluate one finished quickstart: TAGI per paraphrase family against the training wordings."""
    from peft_tagi.data.synthetic import SyntheticSuite
    from peft_tagi.pipeline import load_tagi_model, score, serve_by_instruction
    from peft_tagi.quickstart import GENERATION, wording_report

    report = folder / "results.json"
    if not report.is_file():
        raise SystemExit(f"error: {folder} holds no finished quickstart ({report} is missing).")
    config = json.loads(report.read_text())["config"]
    if config.get("validation_tasks"):
        raise SystemExit(f"error: {folder} is a validation run; the paraphrase families are for held-out tasks.")
    suite = SyntheticSuite(seed=config["seed"])
    examples = suite.examples(suite.heldout_tasks(), config["eval_instances"], split="eval", seed=config["seed"] + 1)
    model, tokenizer = load_tagi_model(folder / "work" / "base", folder / "work" / "tagi")
    model.eval()
    families = [suite.paraphrase_family(e) for e in examples]
    predictions = serve_by_instruction(model, tokenizer, examples, **GENERATION)
    training = suite.training_wording_examples(examples)
    reference = score(serve_by_instruction(model, tokenizer, training, **GENERATION), training)
    return {"run": str(folder), "seed": config["seed"], **wording_report(predictions, examples, families, reference)}


def _mean_std(values: list[float]) -> dict:
    return {
        "mean": round(statistics.fmean(values), 2),
        "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
        "per_run": [round(v, 2) for v in values],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", default="wording.json")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    runs = [evaluate_run(folder) for folder in args.runs]
    summary = {
        family: {m: _mean_std([r["families"][family][m] for r in runs]) for m in ("rougeL", "exact_match")}
        for family in runs[0]["families"]
    }
    summary["families_mean"] = {m: _mean_std([r["families_mean"][m] for r in runs]) for m in ("rougeL", "exact_match")}
    summary["training_wordings"] = {
        m: _mean_std([r["training_wordings"][m] for r in runs]) for m in ("rougeL", "exact_match")
    }
    summary["fraction_of_training_wordings"] = _mean_std([r["fraction_of_training_wordings"] for r in runs])
    print(f"TAGI on held-out tasks, {len(runs)} runs (mean ± std):")
    for name, cell in summary.items():
        if name == "fraction_of_training_wordings":
            print(f"  {'families mean / training wordings':<45} {cell['mean']:.3f} ± {cell['std']:.3f}")
        else:
            rouge, em = cell["rougeL"], cell["exact_match"]
            print(
                f"  {name:<45} ROUGE-L {rouge['mean']:5.1f} ± {rouge['std']:4.1f}   "
                f"EM {em['mean']:5.1f} ± {em['std']:4.1f}"
            )
    Path(args.out).write_text(json.dumps({"summary": summary, "runs": runs}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
