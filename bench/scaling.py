"""5. Scaling: the ratios of benchmarks 1 (b/a), 2 and 4 (time; memory in full mode) over the LoRA rank r (at the
base instruction length) and over the instruction length t (at the base rank), plotted side by side.

At the base point (r, t) the figures of the main benchmarks of the same run are reused rather than measured twice
(benchmark 1's only when the sweep uses the same number of instances per task: quick mode uses fewer in the sweep).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from bench import generation, inference, training
from bench.common import Sizes, progress

METRICS = (
    # (key in a point, label, goal, benchmark key, ratio name)
    ("inference", "1. inference b/a (TAGI / concat)", inference.GOAL_B_OVER_A, "inference", "b/a tagi_vs_concat"),
    ("generation", "2. generate_adapter / encoder", generation.GOAL, "generation", "generate_adapter/encoder_forward"),
    ("training_time", "4. distill / LoRA step time", training.TIME_GOAL, "training", "distill/lora time"),
    ("training_memory", "4. distill / LoRA peak memory", training.MEMORY_GOAL, "training", "distill/lora peak memory"),
)


def grid(s: Sizes) -> list[tuple[int, int]]:
    points = [(r, s.instruction_len) for r in s.scaling_r]
    points += [(s.r, t) for t in s.scaling_t if (s.r, t) not in points]
    return points


def _point_from(results: dict[str, dict]) -> dict:
    point = {}
    for key, _label, _goal, bench, ratio in METRICS:
        entry = results.get(bench, {}).get("ratios", {}).get(ratio)
        if entry is not None:
            point[key] = entry
    return point


def run(s: Sizes, device: torch.device, threads: int, main_results: dict[str, dict], decode: str = "forward") -> dict:
    n_instances = s.scaling_n_instances or s.n_instances
    points = []
    for r, t in grid(s):
        sized = dataclasses.replace(s, r=r, instruction_len=t, n_instances=n_instances)
        base_point = (r, t) == (s.r, s.instruction_len)
        # At the base point, reuse what the main benchmarks measured on the same sizes.
        reuse = {
            "inference": base_point
            and n_instances == s.n_instances
            and main_results.get("inference", {}).get("details", {}).get("decode") == decode,
            "generation": base_point and "generation" in main_results,
            "training": base_point and "training" in main_results,
        }
        progress(f"scaling r={r} t={t}" + (" (partly from the main benchmarks)" if any(reuse.values()) else ""))
        results, sources = {}, {}
        for bench in ("inference", "generation", "training"):
            if reuse[bench]:
                results[bench], sources[bench] = main_results[bench], "main benchmarks"
                continue
            sources[bench] = "scaling run"
            if bench == "inference":
                results[bench] = inference.run(
                    sized,
                    device,
                    decode=decode,
                    variants=("a_concat_lora", "b_tagi_fusion"),
                    repeats=s.scaling_repeats,
                )
            elif bench == "generation":
                results[bench] = generation.run(
                    sized, device, repeats=max(s.scaling_repeats, min(s.generation_repeats, 5))
                )
            else:
                results[bench] = training.run(
                    sized, device, threads, repeats=s.scaling_repeats, memory=s.scaling_memory
                )
        point = {"r": r, "instruction_len": t, "n_instances": n_instances, **_point_from(results)}
        point["source"] = sources
        point["absolute"] = {
            bench: res["absolute"] for bench, res in results.items() if sources[bench] != "main benchmarks"
        }
        points.append(point)
    ratios, absolute = {}, {}
    for point in points:
        tag = f"@ r={point['r']} t={point['instruction_len']}"
        for key, _label, _goal, bench, _name in METRICS:
            # Ratios reused from the main benchmarks are reported there, not twice.
            if key in point and point["source"][bench] != "main benchmarks":
                ratios[f"{key} {tag}"] = point[key]
        for bench, values in point.get("absolute", {}).items():
            for name, summary_ in values.items():
                absolute[f"{bench}:{name} {tag}"] = summary_
    return {
        "description": (
            f"Ratios of benchmarks 1, 2 and 4 over r in {list(s.scaling_r)} (t={s.instruction_len}) and over the "
            f"instruction length t in {list(s.scaling_t)} (r={s.r}); {s.scaling_repeats} rounds per point, "
            f"{n_instances} instances per task in benchmark 1"
            + ("" if s.scaling_memory else "; training memory only at the base point")
            + "."
        ),
        "absolute": absolute,
        "ratios": ratios,
        "points": points,
        "details": {"grid": grid(s), "memory_at_every_point": s.scaling_memory},
        "notes": [],
    }


def plot(result: dict, s: Sizes, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = result["points"]
    sweeps = [
        (
            "LoRA rank r",
            "r",
            [p for p in points if p["instruction_len"] == s.instruction_len],
            f"t = {s.instruction_len}",
        ),
        ("instruction length t (tokens)", "instruction_len", [p for p in points if p["r"] == s.r], f"r = {s.r}"),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (xlabel, key, sweep, fixed) in zip(axes, sweeps):
        sweep = sorted(sweep, key=lambda p: p[key])
        for (metric, label, goal, *_), color in zip(METRICS, colors):
            xs = [p[key] for p in sweep if metric in p]
            ys = [p[metric]["value"] for p in sweep if metric in p]
            if not xs:
                continue
            ax.plot(xs, ys, marker="o", color=color, label=label)
            ax.axhline(goal, color=color, linestyle="--", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks([p[key] for p in sweep])
        ax.set_xticklabels([str(p[key]) for p in sweep])
        ax.set_xlabel(xlabel)
        ax.set_title(f"over {xlabel.split(' (')[0]} ({fixed})")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("ratio (dashed: goal, lower is better)")
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
