"""bench/: the smoke run of every benchmark writes a complete JSON report, and the timing helpers pair rounds."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# QuickstartConfig overrides (`--set`) for runs that only check the plumbing of the seed and ablation reports: a tiny
# T5 made in the run, reading its own instructions (the default's shipped BART and MiniLM are covered by test_cli).
TINY_QUICKSTART = ["base_model=from-scratch", "instruction_encoder=None", "d_model=32", "num_layers=1", "d_ff=64", "r=2", "lora_alpha=4", "train_instances=2", "eval_instances=1",
                   "oracle_instances=2", "base_steps=2", "teacher_steps=2", "pretrain_steps=1", "distill_steps=2",
                   "oracle_steps=1", "batch_size=8"]  # fmt: skip

EXPECTED_RATIOS = {
    "inference": ["b/a tagi_vs_concat", "c/d merged_vs_base"],
    "generation": ["generate_adapter/encoder_forward"],
    "mixed_batch": ["per_example/merged"],
    "training": ["distill/lora time", "distill/lora peak memory"],
}
EXPECTED_ABSOLUTE = {
    "inference": ["a_concat_lora", "b_tagi_fusion", "c_tagi_merged", "d_base_input_only"],
    "generation": ["generate_adapter", "encoder_forward"],
    "mixed_batch": ["per_example_adapters", "merged_lora"],
    "training": ["distill_step", "lora_step", "distill_peak_memory", "lora_peak_memory"],
}


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--threads", "1", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,  # the 120 s claim is asserted below
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        pytest.fail(
            f"python -m bench.run --smoke failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return json.loads(out.read_text()), proc.stdout, out, elapsed


def test_smoke_run_reports_every_benchmark(smoke):
    report, stdout, out, elapsed = smoke
    assert report["mode"] == "smoke" and report["device"] == "cpu"
    assert set(report["benchmarks"]) == {"inference", "generation", "mixed_batch", "training", "scaling"}
    for bench, names in EXPECTED_RATIOS.items():
        ratios = report["benchmarks"][bench]["ratios"]
        for name in names:
            assert _positive(ratios[name]["value"]), (bench, name, ratios[name])
            assert ratios[name]["goal_max"] is not None and isinstance(ratios[name]["met"], bool)
    for bench, names in EXPECTED_ABSOLUTE.items():
        absolute = report["benchmarks"][bench]["absolute"]
        for name in names:
            assert _positive(absolute[name]["median"]), (bench, name, absolute[name])
    for bench, result in report["benchmarks"].items():
        assert result["ratios"] and result["absolute"], bench
        assert all(_positive(e["value"]) for e in result["ratios"].values()), bench
        assert all(_positive(s["median"]) for s in result["absolute"].values()), bench
    memory = report["benchmarks"]["training"]["details"]["memory"]
    assert {"distill", "lora"} <= set(memory) and memory["lora"]["method"]
    assert elapsed < 120, f"the smoke run took {elapsed:.0f} s"


def test_smoke_run_scaling_goals_environment_and_output(smoke):
    report, stdout, out, _ = smoke
    scaling = report["benchmarks"]["scaling"]
    grid = {(p["r"], p["instruction_len"]) for p in scaling["points"]}
    sizes = report["sizes"]
    assert grid == {(r, sizes["instruction_len"]) for r in sizes["scaling_r"]} | {
        (sizes["r"], t) for t in sizes["scaling_t"]
    }
    for point in scaling["points"]:
        for key in ("inference", "generation", "training_time"):
            assert _positive(point[key]["value"]), (point["r"], point["instruction_len"], key)
    assert Path(scaling["plot"]).is_file() and Path(scaling["plot"]).parent == out.parent
    goals = report["goals"]
    assert {g["benchmark"] for g in goals} >= set(EXPECTED_RATIOS)
    assert report["all_goals_met"] == all(g["met"] for g in goals)
    env = report["environment"]
    for key in ("torch", "torch_threads", "cpu_model", "transformers", "peft"):
        assert env[key] not in (None, ""), key
    assert env["torch_threads"] == 1
    assert report["deviations_from_full"] and any("smoke mode" in n for n in report["notes"])
    for title in (
        "1. Inference",
        "2. Adapter generation",
        "3. Mixed-task batch",
        "4. Training",
        "5. Scaling",
        "Goals",
    ):
        assert title in stdout, title


def test_interleaved_rotates_the_order_and_ratios_are_paired():
    import torch

    from bench.common import interleaved, ratio_entry

    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    times = interleaved(fns, repeats=3, warmup=1, device=torch.device("cpu"))
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(len(v) == 3 for v in times.values())
    entry = ratio_entry({"x": [2.0, 4.0, 9.0], "y": [1.0, 4.0, 3.0]}, "x", "y", goal_max=2.5)
    assert entry["per_round"] == [2.0, 1.0, 3.0] and entry["value"] == 2.0 and entry["met"] is True
    assert entry["ratio_of_medians"] == 4.0 / 3.0


def test_ablation_shares_teachers_only_with_runs_that_need_no_more_of_them(tmp_path):
    from bench.ablation import VARIANTS, plan_runs

    # The quickstart's default trains no bank (it distils without ΔW alignment): the paper's full method cannot load
    # its teachers and trains its own; a run that needs less than its provider trained shares.
    def plan(*names):
        variants = {name: VARIANTS[name] for name in names}
        providers, dependents = plan_runs(variants, [0], True, 3, str(tmp_path), 1)
        return [(run[0], run[7] is not None, run[8]) for run in providers], [run[0] for run in dependents]

    shared = str(tmp_path / "shared-seed0")
    assert plan("quickstart", "full", "no_fusion") == ([("quickstart", True, True), ("full", False, False),
                                                       ("no_fusion", False, False)], [])  # fmt: skip
    assert plan("full", "quickstart", "no_kl") == ([("full", True, True)], ["quickstart", "no_kl"])
    assert plan_runs({"full": {}}, [0], True, 3, str(tmp_path), 1)[0][0][7] == shared


def test_ablation_runs_each_variant_and_reports_every_row(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    tiny = TINY_QUICKSTART
    out = tmp_path / "ablation.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.ablation", "--fast", "--validation", "3", "--variants",
         "no_kl", "no_fusion", "per_task_teachers", "--seeds", "0", "1", "--jobs", "2", "--threads", "1",
         "--work-dir", str(tmp_path / "runs"), "--out", str(out), "--set", *tiny],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["overrides"]["d_model"] == 32
    assert [(r["variant"], r["seed"]) for r in report["results"]] == [
        ("no_kl", 0), ("no_kl", 1), ("no_fusion", 0), ("no_fusion", 1), ("per_task_teachers", 0),
        ("per_task_teachers", 1)
    ]  # fmt: skip
    # Per seed, no_kl trains the shared stages and no_fusion reuses them (the same base: the same base row);
    # per_task_teachers changes the teachers, so it trains its own.
    runs = {(r["variant"], r["seed"]): r for r in report["results"]}
    for seed in (0, 1):
        shared = str(tmp_path / "runs" / f"shared-seed{seed}")
        assert runs["no_kl", seed]["shared_stages_from"] == runs["no_fusion", seed]["shared_stages_from"] == shared
        assert runs["no_fusion", seed]["rows"]["base"] == runs["no_kl", seed]["rows"]["base"]
        assert runs["per_task_teachers", seed]["shared_stages_from"] != shared
        assert not (tmp_path / "runs" / f"no_fusion-seed{seed}" / "work" / "base").exists()
    for name in ("no_kl", "no_fusion", "per_task_teachers"):
        cell = report["summary"][name]["tagi"]["rougeL"]
        seeds = [r["rows"]["tagi"]["rougeL"] for r in report["results"] if r["variant"] == name]
        assert cell["per_seed"] == seeds and cell["mean"] == round(statistics.fmean(seeds), 2)
        assert cell["std"] == round(statistics.stdev(seeds), 2)
    assert runs["no_fusion", 0]["overrides"]["instruction_fusion"] is False
    assert runs["per_task_teachers", 0]["overrides"]["group_by"] == "task_name"
    for result in report["results"]:
        assert result["evaluated_on"] == "validation (training tasks left out)"
        assert set(result["instruction_swap"]) == {"given_instruction", "own_task"}
        assert set(result["rows"]) == {"base", "meta_teacher", "tagi", "tagi_plain_lora", "oracle"}
        assert all(0 <= row["rougeL"] <= 100 for row in result["rows"].values())
    assert "per_task_teachers" in proc.stdout
    assert "±" in proc.stdout
    # The same command again reads every finished run back instead of redoing it.
    again = subprocess.run(proc.args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    rerun = json.loads(out.read_text())["results"]
    assert all(r["resumed"] for r in rerun) and not any(r["resumed"] for r in report["results"])
    assert [r["rows"] for r in rerun] == [r["rows"] for r in report["results"]]
    # The README's example is chosen on these validation runs' models: every task both trained on, worst run first.
    from bench.readme_example import task_examples
    from peft_tagi.data.synthetic import SyntheticSuite
    from peft_tagi.quickstart import split_tasks

    choice = tmp_path / "readme_example.json"
    shared = [str(tmp_path / "runs" / f"shared-seed{seed}") for seed in (0, 1)]
    chosen = subprocess.run(
        [sys.executable, "-m", "bench.readme_example", *shared, "--inputs", "2", "--threads", "1", "--out", str(choice),
         "--also-right-on", shared[0]],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert chosen.returncode == 0, chosen.stderr[-4000:]
    choice_report = json.loads(choice.read_text())
    trained = [{t.name: t for t in split_tasks(SyntheticSuite(seed=seed), 3)[0]} for seed in (0, 1)]
    assert {e["task"] for e in choice_report["ranked"]} == set(trained[0]) & set(trained[1])
    lowest = [e["lowest_exact_match"] for e in choice_report["ranked"]]
    assert lowest == sorted(lowest, reverse=True)
    for entry in choice_report["ranked"]:
        scores = [run["exact_match"][entry["task"]] for run in choice_report["runs"]]
        assert entry["lowest_exact_match"] == min(scores) and 0 <= min(scores) <= 100
        assert entry["instruction"] == trained[0][entry["task"]].canonical_instructions()[0]
    # The example: the top task whose answers differ by input, each run's inputs of it served on every run (the
    # --also-right-on run too), and the inputs listed as right are those that every run answered right.
    example = choice_report["example"]
    task = trained[0][example["task"]]
    first_run = json.loads((Path(shared[0]) / "results.json").read_text())["config"]
    answers = {name: {x["output"] for x in rows} for name, rows in task_examples(first_run, 2).items()}
    varied = [e["task"] for e in choice_report["ranked"] if len(answers[e["task"]]) > 1]
    assert example["task"] == varied[0] and example["instruction"] == task.canonical_instructions()[0]
    assert [run["run"] for run in example["outputs_per_run"]] == [*shared, shared[0]]
    assert example["also_right_on"] == [shared[0]]
    assert 2 <= len(example["inputs"]) <= 4
    for entry in example["inputs"]:
        assert entry["reference"] == task.apply(entry["input"].split())
    right = [
        e["input"]
        for e in example["inputs"]
        if all(run["outputs"][e["input"]] == e["reference"] for run in example["outputs_per_run"])
    ]
    assert example["right_on_every_run"] == right
    # How far the generated adapters move with a rewording, with the steps swapped, between tasks: on the right
    # tasks and wordings (one task recomputed here from its adapters).
    distances_out = tmp_path / "order_adapters.json"
    measured = subprocess.run(
        [sys.executable, "-m", "bench.order_adapters", shared[0], "--threads", "1", "--out", str(distances_out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert measured.returncode == 0, measured.stderr[-4000:]
    [order] = json.loads(distances_out.read_text())["runs"]
    suite, (train_tasks, left_out) = SyntheticSuite(seed=0), split_tasks(SyntheticSuite(seed=0), 3)

    def composes_reversed(task) -> bool:
        try:
            return suite.compose(*task.primitives[::-1]) is not None
        except ValueError:
            return False

    assert set(order["evaluated_tasks"]["per_task"]) == {t.name for t in left_out if composes_reversed(t)}
    trained = {t.primitives for t in train_tasks}
    assert set(order["training_pairs"]["per_task"]) == {t.name for t in train_tasks if t.primitives[::-1] in trained}
    for part in ("evaluated_tasks", "training_pairs"):
        figures = order[part]
        assert figures["other_task"] > 0 and figures["adapter_norm"] > 0
        assert figures["steps_swapped"] == pytest.approx(
            statistics.fmean(t["steps_swapped"] for t in figures["per_task"].values())
        )
    from bench.order_adapters import delta_w
    from bench.readme_example import load_run
    from peft_tagi import TaskAdapter

    task = next(t for t in train_tasks if t.name in order["training_pairs"]["per_task"])
    reverse = suite.compose(*task.primitives[::-1])
    _, model, tokenizer = load_run(Path(shared[0]))
    # A variant that reused the shared stages has no base of its own: it loads the one its checkpoint names, the
    # shared run's, with its own hypernetwork.
    variant_config, variant, _ = load_run(tmp_path / "runs" / "no_fusion-seed0")
    assert variant_config["instruction_fusion"] is False
    shared_base, variant_base = model.get_base_model().state_dict(), variant.get_base_model().state_dict()
    assert shared_base.keys() == variant_base.keys()
    assert all(torch.equal(shared_base[k], variant_base[k]) for k in shared_base)
    assert model.peft_config["default"].instruction_fusion and not variant.peft_config["default"].instruction_fusion
    own, swapped = (
        delta_w(TaskAdapter.from_instruction(model, tokenizer, t.canonical_instructions()[0])) for t in (task, reverse)
    )
    assert order["training_pairs"]["per_task"][task.name]["steps_swapped"] == pytest.approx(
        (own - swapped).norm().item(), rel=1e-5
    )
    (tmp_path / "heldout").mkdir()
    (tmp_path / "heldout" / "results.json").write_text(json.dumps({"config": {"seed": 0, "validation_tasks": 0}}))
    refused = subprocess.run(
        [sys.executable, "-m", "bench.readme_example", str(tmp_path / "heldout"), "--out", str(choice)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert refused.returncode != 0 and "not a validation run" in refused.stderr
    unknown = subprocess.run(
        [sys.executable, "-m", "bench.ablation", "--variants", "no_such_variant"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert unknown.returncode != 0 and "unknown variants ['no_such_variant']" in unknown.stderr


def test_a_finished_run_is_read_back_only_for_the_settings_it_ran_with(tmp_path):
    from dataclasses import asdict, replace

    from bench.ablation import _finished
    from peft_tagi.quickstart import QuickstartConfig

    def record(config, drop=()):
        recorded = {k: v for k, v in json.loads(json.dumps(asdict(config))).items() if k not in drop}
        (tmp_path / "results.json").write_text(json.dumps({"config": recorded, "timings_s": {"teachers": 2.0}}))

    # A run recorded before free wordings existed ran without them: read back for free_wordings=0, not for the
    # default, which rewords half the instructions when an instruction encoder reads them.
    minilm = QuickstartConfig(seed=1, validation_tasks=12, instruction_encoder="minilm")
    record(minilm, drop=("free_wordings",))
    assert _finished(tmp_path, replace(minilm, free_wordings=0.0), None)["resumed"] is True
    assert _finished(tmp_path, minilm, None) is None
    # Without an encoder the default means no free wordings, as before.
    default = QuickstartConfig(seed=1, validation_tasks=12, instruction_encoder=None)
    record(default, drop=("free_wordings",))
    assert _finished(tmp_path, default, None)["resumed"] is True
    assert _finished(tmp_path, replace(default, seed=2), None) is None
    assert _finished(tmp_path, default, "elsewhere") is None  # its shared stages came from nowhere else
    # A report records the fraction the run used; a config that leaves it to the default matches it.
    record(replace(minilm, free_wordings=minilm.free_wording_fraction()))
    assert minilm.free_wording_fraction() == 0.75 and _finished(tmp_path, minilm, None) is not None
    # A run recorded before there were six free phrasings per step drew from the first three.
    fw = replace(minilm, free_wordings=0.5)
    record(replace(fw, free_wording_variety=3), drop=("free_wording_variety",))
    assert _finished(tmp_path, replace(fw, free_wording_variety=3), None) is not None
    assert _finished(tmp_path, replace(fw, free_wording_variety=6), None) is None
    # A run recorded before the trunk's width was a setting had the TagiConfig default.
    record(minilm, drop=("hypernetwork_hidden_size",))
    assert _finished(tmp_path, minilm, None) is not None
    assert _finished(tmp_path, replace(minilm, hypernetwork_hidden_size=512), None) is None
    record(default)
    (tmp_path / "results.json").write_text(
        (tmp_path / "results.json").read_text().replace('"seed": 1', '"seed": 1, "from_scratch": true')
    )
    assert _finished(tmp_path, default, None) is None  # a setting that no longer exists: not this run


def test_memory_model_predicts_a_measured_step_within_20_percent():
    from bench.memory import VALIDATION_SHAPES, Workload, measure, predict

    workload = Workload(batch_size=4, instruction_len=24, input_len=16, output_len=8, num_groups=6,
                        unique_instructions=2, r=8, hypernetwork_hidden_size=32, module_embedding_dim=16)  # fmt: skip
    config = VALIDATION_SHAPES["t5-small-ish"]()
    for stage in ("teachers", "pretrain"):
        measured = measure(config, workload, stage, "fp32", checkpointing=False)
        predicted = predict(config, workload, stage, "fp32", checkpointing=False)
        # the step's activations are a large part of the peak, so a wrong activation model cannot pass
        assert measured["peak"] > 1.5 * measured["at_start"], (stage, measured)
        assert abs(predicted["peak"] / measured["peak"] - 1) < 0.2, (stage, predicted, measured)


def test_memory_cli_writes_its_table(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    out = tmp_path / "memory.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.memory", "--models", "t5-base", "t5-11b", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    rows = report["table"]
    assert {(r["model"], r["stage"], r["dtype"], r["checkpointing"]) for r in rows} == {
        (m, s, d, c) for m in ("t5-base", "t5-11b") for s in ("teachers", "pretrain", "distill")
        for d in ("fp32", "bf16", "int8", "int4") for c in (False, True)
    }  # fmt: skip
    by_key = {(r["model"], r["stage"], r["dtype"], r["checkpointing"]): r for r in rows}
    # t5-11b (v1.1 xxl) has ~11.3e9 parameters; counted exactly on the meta device
    assert 11.0e9 < by_key[("t5-11b", "pretrain", "fp32", False)]["params"]["base"] < 11.6e9
    for model in ("t5-base", "t5-11b"):
        fp32, bf16 = by_key[(model, "distill", "fp32", False)], by_key[(model, "distill", "bf16", False)]
        ckpt = by_key[(model, "distill", "bf16", True)]
        assert bf16["peak_bytes"] < fp32["peak_bytes"] and ckpt["peak_bytes"] < bf16["peak_bytes"]
        assert by_key[(model, "distill", "int4", True)]["peak_bytes"] < ckpt["peak_bytes"]
    assert by_key[("t5-base", "pretrain", "bf16", True)]["fits"]["24GB"]
    assert not by_key[("t5-11b", "distill", "fp32", False)]["fits"]["80GB"]
    assert "t5-11b" in proc.stdout and "fits 24/40/80 GB" in proc.stdout


def test_gpu_check_runs_on_cpu_tiny(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--tiny", "--steps", "2",
         "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    distill = report["distill"]
    assert report["dtype"] == "bf16" and report["checkpointing"] is True
    assert distill["finite_losses"] and len(distill["measured"]["losses"]) == 2
    assert 0.8 < distill["predicted_over_measured"] < 1.2, distill
    assert _positive(report["inference"]["ratios"]["b/a tagi_vs_concat"]["value"])


def test_quality_over_seeds_reports_mean_std_and_the_bar(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    tiny = TINY_QUICKSTART
    out = tmp_path / "quality.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.quality", "--fast", "--seeds", "0", "1", "--jobs", "2",
         "--work-dir", str(tmp_path / "runs"), "--out", str(out), "--set", *tiny],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["seeds"] == [0, 1] and [r["seed"] for r in report["results"]] == [0, 1]
    assert set(report["quality_bar"]["per_seed"]) == {"0", "1"}
    for seed, bar in report["quality_bar"]["per_seed"].items():
        rows = next(r["rows"] for r in report["results"] if str(r["seed"]) == seed)
        assert bar["gain_over_base"] == round(rows["tagi"]["rougeL"] - rows["base"]["rougeL"], 2)
    # A two-step tiny run learns nothing: the bar must be reported as not met, not passed by default.
    assert report["quality_bar"]["met"] is False and "quality bar" in proc.stdout and "NOT met" in proc.stdout
    assert out.with_suffix(".png").stat().st_size > 1000


def test_paired_differences_against_the_full_method():
    from bench.ablation import paired_differences

    def run(variant, seed, rouge, failed=False):
        if failed:
            return {"variant": variant, "seed": seed, "error": "FloatingPointError: diverged"}
        return {"variant": variant, "seed": seed, "rows": {"tagi": {"rougeL": rouge, "exact_match": rouge / 2}}}

    # The seeds' levels differ by far more than the variants do; pairing by seed removes them.
    runs = [run("full", 0, 30.0), run("full", 1, 20.0), run("full", 2, 40.0), run("full", 3, 10.0)]
    runs += [run("worse", 0, 27.0), run("worse", 1, 17.5), run("worse", 2, 36.5), run("worse", 3, 7.0)]
    runs += [run("same", 0, 31.0), run("same", 1, 19.0), run("same", 2, 40.5), run("same", 3, 9.0, failed=True)]
    diffs = paired_differences(runs)
    assert set(diffs) == {"worse", "same"}
    worse, same = diffs["worse"]["rougeL"], diffs["same"]["rougeL"]
    assert worse["per_seed"] == [-3.0, -2.5, -3.5, -3.0] and worse["mean"] == -3.0
    assert worse["ci95"][1] < 0 and worse["beyond_noise"] is True
    assert diffs["same"]["seeds"] == [0, 1, 2]  # the failed seed is left out
    assert same["per_seed"] == [1.0, -1.0, 0.5] and same["ci95"][0] < 0 < same["ci95"][1]
    assert same["beyond_noise"] is False
    assert diffs["worse"]["exact_match"]["mean"] == -1.5


def test_base_pretraining_compares_recipes_paired_by_seed(tmp_path):
    from bench.base_pretraining import RECIPES, run_one, summarise

    # One real (tiny) run: base pretraining, the teachers stage, the meta-train teacher scored on every split.
    run = run_one("bart", 0, str(tmp_path), 1, base_steps=4, teacher_steps=2)
    assert run["recipe"] == "bart" and run["seed"] == 0 and math.isfinite(run["base_final_loss"])
    assert (tmp_path / "bart-seed0" / "teachers" / "teachers" / "teachers.json").is_file()
    assert json.loads((tmp_path / "bart-seed0" / "base" / "config.json").read_text())["model_type"] == "bart"
    for split in ("validation", "trained_tasks", "step_order_requested", "step_order_original", "shuffled_words"):
        assert 0.0 <= run[split]["rougeL"] <= 100.0 and 0.0 <= run[split]["exact_match"] <= 100.0
    assert {"t5", "bart"} <= set(RECIPES)

    def fake(recipe, seed, rouge):
        scores = {"rougeL": rouge, "exact_match": rouge / 4}
        return {
            "recipe": recipe,
            "seed": seed,
            "validation": scores,
            "trained_tasks": {"rougeL": 50.0, "exact_match": 10.0},
        }

    # Seeds differ by 20 points, the recipes by about 5 on each seed: the paired interval sees it.
    runs = [
        fake("t5", 0, 20.0),
        fake("bart", 0, 25.0),
        fake("t5", 1, 40.0),
        fake("bart", 1, 46.0),
        fake("t5", 2, 30.0),
    ]
    runs += [fake("bart", 2, 34.0)]
    summary = summarise(runs)
    assert summary["per_recipe"]["t5"]["validation"]["rougeL"]["per_seed"] == [20.0, 40.0, 30.0]
    assert summary["per_recipe"]["bart"]["validation"]["rougeL"]["mean"] == round((25 + 46 + 34) / 3, 2)
    diff = summary["minus_first_recipe"]["bart"]["validation/rougeL"]
    assert diff["per_seed"] == [5.0, 6.0, 4.0] and diff["mean"] == 5.0 and diff["beyond_noise"] is True
    assert summary["minus_first_recipe"]["bart"]["trained_tasks/rougeL"]["beyond_noise"] is False
