"""The quickstart's teacher stage with the bank of per-task LoRAs (the paper's) against without it (today's default).

    python -m bench.teacher_stage --steps 150 --rounds 3 --out teacher_stage.json

Each round runs the quickstart (`run_quickstart`, default config and seed) twice, the order alternating: once as
`lambda_ins=1.0` makes it (the teacher stage trains the meta-train LoRA and the bank, `teacher_loras="both"`), once
as the default (the meta-train LoRA alone, `"meta"`), with `--steps` teacher steps and one step of every later stage.
It prints the teacher stage's seconds of each run (`results["timings_s"]["teachers"]`), their medians and the median
of the per-round ratios, and writes them as JSON. The two must train the same meta-train LoRA bit for bit
(tests/test_trainer.py); here only the time is measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="teacher_stage.json")
    args = parser.parse_args()

    import torch

    from peft_tagi.quickstart import QuickstartConfig, run_quickstart

    torch.set_num_threads(args.threads)
    budgets = dict(teacher_steps=args.steps, pretrain_steps=1, distill_steps=1, oracle_steps=1)
    configs = {"both": QuickstartConfig(lambda_ins=1.0, **budgets), "meta": QuickstartConfig(**budgets)}
    seconds: dict[str, list[float]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as work:
        for round_ in range(args.rounds):
            for name in list(configs)[:: 1 if round_ % 2 == 0 else -1]:
                assert configs[name].teacher_loras() == name
                results = run_quickstart(Path(work) / name, configs[name], overwrite=True)
                seconds[name].append(results["timings_s"]["teachers"])
                print(f"round {round_}: {name} {seconds[name][-1]:.1f} s", flush=True)
    ratios = [m / b for m, b in zip(seconds["meta"], seconds["both"])]
    report = {
        "steps": args.steps,
        "threads": args.threads,
        "seconds": seconds,
        "median_s": {name: statistics.median(values) for name, values in seconds.items()},
        "meta_over_both": {"per_round": ratios, "median": statistics.median(ratios)},
    }
    print(
        f"teacher stage, {args.steps} steps: both {report['median_s']['both']:.1f} s, meta alone "
        f"{report['median_s']['meta']:.1f} s (medians); meta / both {report['meta_over_both']['median']:.2f}"
    )
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
