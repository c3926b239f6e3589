"""Ablations of the quickstart: without hypernetwork pretraining, without KL, without ΔW alignment, without fusion.

    python -m bench.ablation --out ablation.json                 # the held-out report, one run per variant
    python -m bench.ablation --validation 12 --out val.json      # on 12 left-out training tasks (for choosing settings)
    python -m bench.ablation --fast --out smoke.json             # smoke run
    python -m bench.ablation --seeds 0 1 2 --jobs 2 --threads 1  # every variant over three seeds: mean ± std

Each variant is the full quickstart (`peft_tagi.quickstart.run_quickstart`) with one change, in its own process;
`--jobs` runs several at once (each gets its share of the CPU threads). The variants of a seed share its base model,
teachers and oracle (`run_quickstart(reuse_from=...)`): the first variant of each seed trains them in
`WORK_DIR/shared-seedN` (a finished folder there is reused as it is), every other variant loads them. So variants
differ only in the stages they ablate (a paired comparison) and the shared stages are paid once per seed; a variant
that changes a shared setting (e.g. `per_task_teachers`) trains its own. `--set key=value` changes the base config
of every variant (e.g. `--set learning_rate=3e-3`); `--variants` picks variants by name; `--seeds` repeats every
variant over seeds (the seed changes the task split's data, the initialisations and the data order), and the report
gives each row's mean ± std over seeds (sample std) next to the per-seed figures. A run whose folder already holds
the results of the same settings is read back, not redone, so an interrupted ablation resumes where it stopped.
"""

from __future__ import annotations

import argparse
import ast
import json
import multiprocessing as mp
import os
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

# The paper's full method (all three losses, fusion, hypernetwork pretraining), then one component removed. The
# quickstart's default is the "no_delta_alignment" variant without the KL term and with 1000 distillation steps (both
# chosen on left-out training tasks).
FULL_METHOD = {"lambda_ins": "sigmoid", "lambda_kl": 5.0, "distill_steps": 750}
VARIANTS = {
    "quickstart": {},  # the quickstart's own default, as `peft-tagi quickstart` runs it
    # The default before the shipped base: a T5 pretrained in the run, instructions read by its own encoder.
    "from_scratch": {"base_model": "from-scratch", "instruction_encoder": None},
    "full": dict(FULL_METHOD),
    "no_hypernetwork_pretraining": {**FULL_METHOD, "pretrain_steps": 0},
    "no_kl": {**FULL_METHOD, "lambda_kl": 0.0},
    "no_delta_alignment": {**FULL_METHOD, "lambda_ins": 0.0},
    "no_fusion": {**FULL_METHOD, "instruction_fusion": False},
    # Not a removal: ΔW alignment to one parameter teacher per task instead of per category.
    "per_task_teachers": {**FULL_METHOD, "group_by": "task_name"},
    # Not of the paper: the instructions read by a pretrained sentence encoder (extra [encoder]), against "quickstart".
    # MiniLM alone, as measured before free wordings existed.
    "minilm": {"instruction_encoder": "minilm", "free_wordings": 0.0},
    # MiniLM with half the training instructions reworded in words outside the suite's vocabulary (never the
    # open-vocabulary evaluation family's), three phrasings per step to draw from: the first free wordings.
    "minilm_free_wordings": {"instruction_encoder": "minilm", "free_wordings": 0.5, "free_wording_variety": 3},
    # The same with twice the phrasings per step and sentence templates to draw from, half or three quarters reworded
    # (the latter won on validation: `peft-tagi quickstart --instruction-encoder minilm` trains so).
    "minilm_free_wordings_6": {"instruction_encoder": "minilm", "free_wordings": 0.5, "free_wording_variety": 6},
    "minilm_free_wordings_6_75": {"instruction_encoder": "minilm", "free_wordings": 0.75, "free_wording_variety": 6},
    # The hypernetwork reads the instruction with learned queries, each with a preference for where in the
    # instruction a token sits, instead of one mean: can it tell "a, then b" from "b, then a"? (Lost on validation.)
    "pooling_queries_4": {"pooling": "attention", "pooling_queries": 4},
    # The base shipped in the package (a BART, learned absolute positions) read through MiniLM with free wordings:
    # chosen against "from_scratch" on validation, the quickstart's default since (it trains its own base stages).
    "embedded_minilm_free_wordings": {"base_model": "embedded", "instruction_encoder": "minilm"},
    # The default without the paper's hypernetwork pretraining (75-88 s of the run), and with twice as much of it in
    # place of a fifth of distillation (the same number of steps).
    "no_pretraining": {"pretrain_steps": 0},
    "pretrain300_distill600": {"pretrain_steps": 300, "distill_steps": 600},
    # A wider hypernetwork trunk: TAGI stays below its teacher on the very tasks it trains on (validation runs of the
    # default, seeds 0-2: 19-25 exact match against 34-47): is the hypernetwork too small to write every adapter?
    "hidden_512": {"hypernetwork_hidden_size": 512},
    "hidden_1024": {"hypernetwork_hidden_size": 1024},
    # Distillation from the references alone (no KL to a teacher that is itself exactly right on a third to a half of
    # the training tasks' inputs), which also skips the teacher's forward pass of every step; and the time saved spent
    # on more steps (the quickstart's default from 6c24a30 to 1300 steps); the default before it
    # (750 steps with the paper's KL weight of 5), and 1000 steps with the KL term kept.
    "no_kl_default": {"lambda_kl": 0.0, "distill_steps": 750},
    "no_kl_distill_1000": {"lambda_kl": 0.0, "distill_steps": 1000},
    "kl_distill_750": {"lambda_kl": 5.0, "distill_steps": 750},
    "distill_1000": {"lambda_kl": 5.0, "distill_steps": 1000},
    # The time the teacher stage no longer spends on a bank no stage reads (teacher_loras), and more, spent on steps
    # (1300 is "quickstart" since; docs/quality.md, "More distillation steps").
    "no_kl_distill_1300": {"lambda_kl": 0.0, "distill_steps": 1300},
    "no_kl_distill_1600": {"lambda_kl": 0.0, "distill_steps": 1600},
    # Free wordings drawn from twelve phrasings per step and twelve sentence templates instead of six: does a wider
    # cover of the encoder's space carry unseen words (the open-vocabulary family) to the right adapter?
    "free_wordings_12": {"free_wording_variety": 12},
    # Today's default without instruction fusion: every difference between two tasks must then be in the adapter.
    "no_fusion_default": {"instruction_fusion": False},
}
REPORT_ROWS = ("base", "meta_teacher", "tagi", "tagi_plain_lora", "oracle")


def parse_value(text: str):
    """A `--set key=value` value as Python reads it (number, bool, tuple, ...), else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _config(overrides: dict, fast: bool, validation: int, seed: int):
    from peft_tagi.quickstart import QuickstartConfig

    config = QuickstartConfig.fast() if fast else QuickstartConfig()
    return replace(config, validation_tasks=validation, seed=seed, **overrides)


def _wait_for(folder: Path, poll_s: float = 5.0) -> bool:
    """Wait until the run in `folder` has finished (True) or failed (False)."""
    while True:
        if (folder / "results.json").is_file():
            return True
        if (folder / "failed.txt").is_file():
            return False
        time.sleep(poll_s)


# Settings added to QuickstartConfig after runs were recorded, with the value that reproduces those runs.
ADDED_SETTINGS = {
    "free_wordings": 0.0, "free_wording_variety": 3, "pooling": "mean", "pooling_queries": 1,
    "hypernetwork_hidden_size": 256,
}  # fmt: skip


def _settings(recorded: dict) -> dict | None:
    """A config (as `asdict` or a report records it) as the behaviour it stands for: settings added since filled in
    (`ADDED_SETTINGS`), `free_wordings` resolved (and `free_wording_variety` dropped without free wordings); None for
    a config of settings that no longer exist."""
    from peft_tagi.quickstart import QuickstartConfig

    try:
        config = QuickstartConfig(**{**ADDED_SETTINGS, **recorded})
    except TypeError:
        return None
    fraction = config.free_wording_fraction()
    # Without free wordings, how many there are to draw from changes nothing.
    variety = config.free_wording_variety if fraction else None
    return json.loads(json.dumps({**asdict(config), "free_wordings": fraction, "free_wording_variety": variety}))


def _finished(out: Path, config, reuse_from: str | None) -> dict | None:
    """The results in `out` if it holds a finished run of exactly this config (an interrupted ablation resumes
    without redoing them), else None."""
    report = out / "results.json"
    if not report.is_file():
        return None
    results = json.loads(report.read_text())
    same_config = _settings(results["config"]) == _settings(asdict(config))
    if not same_config or results.get("reused_from") != (str(reuse_from) if reuse_from else None):
        return None
    return {**results, "seconds": round(sum(results["timings_s"].values()), 1), "resumed": True}


def _run(
    name: str,
    overrides: dict,
    fast: bool,
    validation: int,
    out_dir: str,
    threads: int,
    seed: int,
    shared: str | None = None,
    provides: bool = False,
) -> dict:
    """One (variant, seed) run. `shared`: the seed's shared-stage folder: with `provides`, this run trains every
    stage there; without, it waits for that folder and reuses its shared stages. None: every stage in its own
    folder."""
    import torch

    torch.set_num_threads(threads)
    from peft_tagi.quickstart import run_quickstart

    config = _config(overrides, fast, validation, seed)
    out = Path(shared) if provides else Path(out_dir) / f"{name}-seed{seed}"
    reuse_from = None
    if shared is not None and not provides:
        reuse_from = shared if _wait_for(Path(shared)) else None  # the provider failed: train our own
    start = time.perf_counter()
    results = _finished(out, config, reuse_from)
    try:
        if results is None:
            (out / "failed.txt").unlink(missing_ok=True)
            results = run_quickstart(out, config, overwrite=True, reuse_from=reuse_from)
    except BaseException as error:
        # Runs waiting for this folder learn that it failed, whatever the reason.
        out.mkdir(parents=True, exist_ok=True)
        (out / "failed.txt").write_text(f"{type(error).__name__}: {error}\n")
        if not isinstance(error, (ValueError, FloatingPointError)):
            raise
        # A diverged run is a result to report, not a crash.
        return {"variant": name, "seed": seed, "overrides": overrides, "error": f"{type(error).__name__}: {error}"}
    return {
        "variant": name,
        "seed": seed,
        "overrides": overrides,
        "seconds": results["seconds"] if "seconds" in results else round(time.perf_counter() - start, 1),
        "timings_s": results["timings_s"],
        "rows": {row: {k: results["rows"][row][k] for k in ("rougeL", "exact_match")} for row in REPORT_ROWS},
        "instruction_swap": {k: v["rougeL"] for k, v in results["instruction_swap"].items()},
        "training_tasks": {
            k: {m: v[m] for m in ("rougeL", "exact_match")} for k, v in results["training_tasks"].items()
        },
        "evaluated_on": results["evaluated_on"],
        "shared_stages_from": str(reuse_from or out),
        "resumed": results.get("resumed", False),
        **({"wording": results["wording"]} if "wording" in results else {}),
        **{
            key: results[key]
            for key in ("step_order", "shuffled_words", "instruction_reading", "random_instruction", "open_vocabulary")
            if key in results
        },
    }


def plan_runs(
    variants: dict[str, dict],
    seeds: list[int],
    fast: bool,
    validation: int,
    work_dir: str,
    threads: int,
    share_stages: bool = True,
) -> tuple[list[tuple], list[tuple]]:
    """The `_run` arguments of every (variant, seed) run: (providers, dependents).

    Per seed, the runs whose shared-stage settings agree share `work_dir/shared-seedN` (see the module docstring): the
    first variant provides it, the others depend on it. A run that changes a shared setting, or that aligns ΔW to a
    bank of teachers the provider does not train (`QuickstartConfig.teacher_loras`), is a provider of its own.
    `share_stages=False`: every run trains all of its stages in `work_dir/VARIANT-seedN`.
    """
    from peft_tagi.quickstart import SHARED_STAGE_FIELDS, check_reusable

    first = next(iter(variants.values()))
    providers, dependents = [], []
    for seed in seeds:
        shared = Path(work_dir) / f"shared-seed{seed}"
        reference = _config(first, fast, validation, seed)
        finished = share_stages and (shared / "results.json").is_file()
        if finished:
            check_reusable(shared, reference)  # a stale folder from other settings: refuse before any run starts
        for index, (name, overrides) in enumerate(variants.items()):
            config = _config(overrides, fast, validation, seed)
            needs_bank = config.teacher_loras() == "both" and reference.teacher_loras() != "both"
            if (
                not share_stages
                or needs_bank
                or any(getattr(config, f) != getattr(reference, f) for f in SHARED_STAGE_FIELDS)
            ):
                providers.append((name, overrides, fast, validation, work_dir, threads, seed, None, False))
            elif index == 0 and (not finished or _finished(shared, config, None) is not None):
                # Trains the shared stages there, or (finished) reads back its own results from there.
                providers.append((name, overrides, fast, validation, work_dir, threads, seed, str(shared), True))
            else:
                dependents.append((name, overrides, fast, validation, work_dir, threads, seed, str(shared), False))
    return providers, dependents


def run_jobs(
    variants: dict[str, dict],
    seeds: list[int],
    fast: bool,
    validation: int,
    work_dir: str,
    jobs: int,
    threads: int,
    share_stages: bool = True,
) -> list[dict]:
    """Every (variant, seed) run of the quickstart (`plan_runs`), `jobs` processes side by side with `threads` torch
    threads each. Providers are queued first, so that a run waiting for its provider never holds back the provider
    itself."""
    threads = threads or max(1, (os.cpu_count() or 2) // jobs)
    providers, dependents = plan_runs(variants, seeds, fast, validation, work_dir, threads, share_stages)
    # A fresh process per run (maxtasksperchild=1), as `peft-tagi quickstart` runs: a worker reused for the next run
    # would carry the last run's memory and warmed caches into that run's wall time and peak memory.
    with mp.get_context("spawn").Pool(jobs, maxtasksperchild=1) as pool:
        runs = pool.starmap(_run, providers + dependents, chunksize=1)
    order = {(name, seed): i for i, (name, seed) in enumerate((n, s) for n in variants for s in seeds)}
    return sorted(runs, key=lambda r: order[(r["variant"], r["seed"])])


def aggregate(runs: list[dict]) -> dict[str, dict]:
    """Per variant: mean, sample std and per-seed values of every row's ROUGE-L and exact match; failed seeds listed."""
    summary: dict[str, dict] = {}
    for name in dict.fromkeys(r["variant"] for r in runs):
        done = [r for r in runs if r["variant"] == name and "rows" in r]
        entry = {"seeds": [r["seed"] for r in done], "failed": {r["seed"]: r["error"] for r in runs if r["variant"] == name and "error" in r}}  # fmt: skip
        for row in REPORT_ROWS:
            for metric in ("rougeL", "exact_match"):
                entry.setdefault(row, {})[metric] = mean_std([r["rows"][row][metric] for r in done])
        summary[name] = entry
    return summary


def mean_std(values: list[float]) -> dict:
    """One figure over seeds: its mean and sample std (rounded to 0.01; None / 0.0 when too few) and the per-seed
    values as measured."""
    return {
        "mean": round(statistics.fmean(values), 2) if values else None,
        "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
        "per_seed": list(values),
    }


# Two-sided 95 % quantiles of Student's t for 1..10 degrees of freedom (n seeds -> n - 1).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def paired_differences(runs: list[dict], reference: str = "full") -> dict[str, dict]:
    """Per variant: TAGI's score minus the `reference` variant's on the same seed (the variants of a seed share its
    base model, teachers and data, so the seed's own level cancels), with mean, sample std, a 95 % t interval and
    whether that interval excludes 0 ("beyond noise"). Seeds where either run failed are left out."""
    score = {(r["variant"], r["seed"]): r["rows"]["tagi"] for r in runs if "rows" in r}
    out: dict[str, dict] = {}
    for name in dict.fromkeys(r["variant"] for r in runs):
        seeds = [s for (v, s) in score if v == name and (reference, s) in score]
        if name == reference or len(seeds) < 2:
            continue
        entry = {"seeds": seeds}
        for metric in ("rougeL", "exact_match"):
            entry[metric] = paired_interval([score[name, s][metric] - score[reference, s][metric] for s in seeds])
        out[name] = entry
    return out


def paired_interval(diffs: list[float]) -> dict:
    """Per-seed differences (at least 2) -> mean, sample std, a 95 % t interval and whether it excludes 0."""
    mean, std = statistics.fmean(diffs), statistics.stdev(diffs)
    half = T_975[min(len(diffs) - 1, len(T_975)) - 1] * std / len(diffs) ** 0.5
    return {
        "mean": round(mean, 2),
        "std": round(std, 2),
        "per_seed": [round(d, 2) for d in diffs],
        "ci95": [round(mean - half, 2), round(mean + half, 2)],
        "beyond_noise": mean - half > 0 or mean + half < 0,
    }


def format_cell(cell: dict) -> str:
    return "failed" if cell["mean"] is None else f"{cell['mean']:.1f} ± {cell['std']:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="ablation.json")
    parser.add_argument("--work-dir", default="ablation-runs")
    parser.add_argument("--variants", nargs="+", default=[v for v in VARIANTS if v != "quickstart"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="QuickstartConfig overrides")
    parser.add_argument("--validation", type=int, default=0, help="evaluate on N left-out training tasks instead")
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per job (default: cores / jobs)")
    parser.add_argument("--reference", default="full", help="the variant the others are compared with, per seed")
    args = parser.parse_args()

    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"error: unknown variants {unknown}; choose from {list(VARIANTS)}.")
    base_overrides = dict(item.split("=", 1) for item in args.set)
    base_overrides = {key: parse_value(value) for key, value in base_overrides.items()}
    variants = {name: {**base_overrides, **VARIANTS[name]} for name in args.variants}
    runs = run_jobs(variants, args.seeds, args.fast, args.validation, args.work_dir, args.jobs, args.threads)
    summary = aggregate(runs)

    evaluated_on = next((r["evaluated_on"] for r in runs if "evaluated_on" in r), "nothing (every run failed)")
    print(f"evaluated on: {evaluated_on}; seeds {args.seeds}  (overrides: {base_overrides or 'none'})")
    print(f"{'variant':<30} {'TAGI R-L':>13} {'TAGI EM':>13} {'teacher R-L':>13} {'base R-L':>13} {'oracle R-L':>13}")
    for name, entry in summary.items():
        cells = [entry["tagi"]["rougeL"], entry["tagi"]["exact_match"], entry["meta_teacher"]["rougeL"]]
        cells += [entry["base"]["rougeL"], entry["oracle"]["rougeL"]]
        print(f"{name:<30} " + " ".join(f"{format_cell(c):>13}" for c in cells))
        for seed, error in entry["failed"].items():
            print(f"  seed {seed} failed: {error}")
    differences = paired_differences(runs, reference=args.reference)
    if differences:
        print(f"TAGI ROUGE-L minus the {args.reference!r} variant's, paired by seed (mean ± std, 95 % t interval):")
        for name, entry in differences.items():
            cell = entry["rougeL"]
            verdict = "beyond noise" if cell["beyond_noise"] else "within noise"
            print(
                f"  {name:<28} {cell['mean']:+6.1f} ± {cell['std']:.1f}  [{cell['ci95'][0]:+.1f}, {cell['ci95'][1]:+.1f}]  {verdict}"
            )
    report = {
        "overrides": base_overrides,
        "seeds": args.seeds,
        "summary": summary,
        "reference": args.reference,
        "paired_differences_vs_reference": differences,
        "results": runs,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
