"""The `peft-tagi` command and the examples, run as a user would: in fresh processes, on tiny local models."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import quickstart_like_folder, tiny_t5, word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
# A quickstart of every stage in seconds (from-scratch T5, no instruction encoder).
MICRO_QUICKSTART = dict(
    base_model="from-scratch", instruction_encoder=None, d_model=32, num_layers=1, d_ff=64, r=2, lora_alpha=4,
    train_instances=2, eval_instances=1, oracle_instances=2, base_steps=2, teacher_steps=2, pretrain_steps=1,
    distill_steps=2, oracle_steps=1, batch_size=8,
)  # fmt: skip
SUBCOMMANDS = ["train", "generate-adapter", "predict", "export", "evaluate", "quickstart", "demo"]


def cli(
    *args: str, timeout: int = 300, check: bool = True, cwd: Path | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "peft_tagi.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
        input=stdin,
    )
    if check and proc.returncode != 0:
        pytest.fail(f"peft-tagi {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


def example(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if proc.returncode != 0:
        pytest.fail(f"examples/{name} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


def test_help_everywhere(capsys):
    # In this process: parsing is all `--help` does (the console script's own `--help` runs in a fresh process below).
    from peft_tagi.cli import parse_args

    for argv in (["--help"], *([name, "--help"] for name in SUBCOMMANDS)):
        with pytest.raises(SystemExit) as exit_:
            parse_args(argv)
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert ("usage: peft-tagi " + argv[0] in out) if len(argv) == 2 else ("train" in out and "quickstart" in out)


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "peft-tagi"
    assert script.exists(), "pip install -e . did not install the peft-tagi console script"
    assert "quickstart" in subprocess.run([str(script), "--help"], capture_output=True, text=True).stdout


def test_bad_data_spec_is_explained(base_dir, tmp_path):
    proc = cli("train", "--stage", "teachers", "--model", str(base_dir), "--data", "c4", "--output-dir",
               str(tmp_path / "o"), check=False)  # fmt: skip
    assert proc.returncode != 0 and "--data must be 'synthetic', 'sni:PATH' or 'p3:PATH_OR_ID'" in proc.stderr


def test_train_generate_export_evaluate_pipeline(base_dir, tmp_path):
    common = ["--model", str(base_dir), "--data", "synthetic", "--max-instances", "2"]
    tiny = ["--r", "4", "--batch-size", "4", "--max-steps", "2", "--cpu"]
    cli("train", "--stage", "teachers", *common, *tiny, "--output-dir", str(tmp_path / "t"))
    assert (tmp_path / "t" / "teachers" / "teachers.json").is_file()
    config = tmp_path / "distill.yaml"
    config.write_text(f"stage: distill\nteachers: {tmp_path / 't' / 'teachers'}\nlambda-kl: 2.0\nr: 4\n")
    cli("train", "--config", str(config), *common, "--max-steps", "2", "--batch-size", "4", "--cpu",
        "--output-dir", str(tmp_path / "d"))  # fmt: skip
    ckpt = tmp_path / "d" / "tagi"
    assert json.loads((ckpt / "adapter_config.json").read_text())["peft_type"] == "TAGI"
    # Teachers without the bank are enough for --lambda-ins 0; the default ΔW alignment is refused, naming the way out.
    cli(
        "train", "--stage", "teachers", "--teacher-loras", "meta", *common, *tiny, "--output-dir", str(tmp_path / "tm")
    )
    assert json.loads((tmp_path / "tm" / "teachers" / "teachers.json").read_text())["bank"] == {}
    proc = cli("train", "--stage", "distill", "--teachers", str(tmp_path / "tm" / "teachers"), *common, *tiny,
               "--output-dir", str(tmp_path / "dm"), check=False)  # fmt: skip
    assert proc.returncode != 0 and "lacks the bank" in proc.stderr and "teacher_loras='both'" in proc.stderr
    # refuses to overwrite a non-empty output folder
    proc = cli("train", "--config", str(config), *common, "--output-dir", str(tmp_path / "d"), check=False)
    assert proc.returncode != 0 and "--overwrite" in proc.stderr

    cli("generate-adapter", "reverse the words", "--model", str(base_dir), "--tagi", str(ckpt), "--out",
        str(tmp_path / "lora"))  # fmt: skip
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    proc = cli("generate-adapter", "reverse the words", "--model", str(base_dir), "--tagi", str(ckpt), "--out",
               str(tmp_path / "lora"), check=False)  # fmt: skip
    assert proc.returncode != 0 and "overwrite" in proc.stderr

    cli("export", str(tmp_path / "lora"), "--model", str(base_dir), "--out", str(tmp_path / "merged"))
    assert (tmp_path / "merged" / "config.json").is_file() and (tmp_path / "merged" / "model.safetensors").is_file()

    out = cli("evaluate", "--model", str(base_dir), "--tagi", str(ckpt), "--data", "synthetic", "--split", "heldout",
              "--max-instances", "1", "--max-new-tokens", "4", "--output", str(tmp_path / "scores.json")).stdout  # fmt: skip
    assert "ROUGE-L" in out
    assert set(json.loads((tmp_path / "scores.json").read_text())) >= {"rougeL", "exact_match", "per_task"}

    served = example("serve_lora.py", "--model", str(base_dir), "--adapter", str(tmp_path / "lora"), "cat dog sun")
    assert served.stdout.startswith("cat dog sun\t")


def test_config_file_rejects_unknown_options(tmp_path, base_dir):
    from peft_tagi.cli import parse_args  # refused while parsing, before any model is read: in this process

    config = tmp_path / "c.json"
    config.write_text(json.dumps({"stage": "teachers", "learning_rat": 0.1}))
    with pytest.raises(SystemExit, match=r"unknown options \['learning_rat'\]"):
        parse_args(["train", "--config", str(config), "--model", str(base_dir), "--output-dir", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="config file .* not found"):
        parse_args(["train", "--config", str(tmp_path / "missing.yaml"), "--model", str(base_dir)])


def test_quickstart_fast_writes_the_report(tmp_path):
    proc = cli("quickstart", "--fast", "--seed", "3", "--output-dir", str(tmp_path / "qs"), timeout=1200)
    results = json.loads((tmp_path / "qs" / "results.json").read_text())
    assert results["config"]["seed"] == 3
    assert results["config"]["free_wordings"] == 0.75  # the fraction used: MiniLM reads the reworded instructions
    swap = results["instruction_swap"]
    assert {"given_instruction", "own_task"} == set(swap) and "instruction swap" in proc.stdout
    assert set(results["training_tasks"]) == {"meta_teacher", "tagi"} and "training tasks" in proc.stdout
    assert set(results["rows"]) == {"base", "meta_teacher", "tagi", "tagi_plain_lora", "oracle"}
    for row in results["rows"].values():
        assert {"rougeL", "exact_match", "ms_per_instance"} <= set(row)
    assert (tmp_path / "qs" / "results.png").stat().st_size > 1000
    assert "TAGI generated adapter (fusion)" in proc.stdout
    # The default: the shipped BART, copied where `predict` and `demo` look for the quickstart's model, read through
    # MiniLM, which the checkpoint names.
    assert results["config"]["base_model"] == "embedded" and "base model" in results["timings_s"]
    assert json.loads((tmp_path / "qs" / "work" / "base" / "config.json").read_text())["model_type"] == "bart"
    assert "pretraining the base model" not in proc.stderr
    assert results["config"]["instruction_encoder"] == "minilm"
    saved = json.loads((tmp_path / "qs" / "work" / "tagi" / "adapter_config.json").read_text())
    assert saved["instruction_encoder"] == "sentence-transformers/all-MiniLM-L6-v2"
    # Whether the instruction is read as a sentence, for TAGI and the teacher it distils.
    for name in ("tagi", "meta_teacher"):
        order = results["step_order"][name]
        assert {"requested", "original"} == set(order) and results["step_order"]["n"] > 0
        assert "exact_match" in results["shuffled_words"][name]
        assert set(results["instruction_reading"][name]) == {
            "requested_over_original", "requested_over_held_out", "shuffled_over_real"
        }  # fmt: skip
    assert "reads the instruction (TAGI" in proc.stdout and "reads the instruction (teacher" in proc.stdout
    assert {"rougeL", "exact_match"} <= set(results["random_instruction"]["tagi"])
    assert set(results["open_vocabulary"]) == {"tagi", "training_wordings", "fraction_of_training_wordings"}
    assert "open-vocabulary family" in proc.stdout and "unknown to the tokenizer" not in proc.stderr
    # Held-out scores by evaluation-only paraphrase family, next to the same examples with training wordings.
    wording = results["wording"]
    assert [f.split(":")[0] for f in wording["families"]] == ["1", "2", "3"] and "wording" in proc.stdout
    mean = sum(f["rougeL"] for f in wording["families"].values()) / 3
    assert wording["families_mean"]["rougeL"] == pytest.approx(mean)
    assert wording["fraction_of_training_wordings"] == pytest.approx(
        mean / wording["training_wordings"]["rougeL"] if wording["training_wordings"]["rougeL"] else 0.0
    )
    # `python -m bench.wording` re-evaluates the saved models of a finished run: the same examples give the same scores.
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    out = tmp_path / "wording.json"
    again = subprocess.run(
        [sys.executable, "-m", "bench.wording", str(tmp_path / "qs"), "--out", str(out)],
        capture_output=True, text=True, timeout=1200, env=env, cwd=ROOT,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-4000:]
    [rerun] = json.loads(out.read_text())["runs"]
    assert rerun["families"] == wording["families"]
    assert rerun["training_wordings"] == wording["training_wordings"]
    # A smoke run stays a smoke run (about 50 s idle) by its step counts: its wall time on a busy machine is no
    # measure of that (over 600 s once, while a benchmark shared the two cores and the hypervisor took up to half).
    steps = ("base_steps", "teacher_steps", "pretrain_steps", "distill_steps", "oracle_steps")
    assert all(0 < results["config"][name] <= 40 for name in steps), {n: results["config"][n] for n in steps}


def test_quickstart_from_scratch_reproduces_the_earlier_default(tmp_path):
    proc = cli("quickstart", "--fast", "--base-model", "from-scratch", "--instruction-encoder", "none",
               "--output-dir", str(tmp_path / "qs"), timeout=1200)  # fmt: skip
    results = json.loads((tmp_path / "qs" / "results.json").read_text())
    # A T5 pretrained in the run, saved where `predict` and `demo` look; its own encoder reads the instructions.
    assert results["config"]["base_model"] == "from-scratch" and "base pretraining" in results["timings_s"]
    assert json.loads((tmp_path / "qs" / "work" / "base" / "config.json").read_text())["model_type"] == "t5"
    assert "pretraining the base model (40 steps)" in proc.stderr
    assert results["config"]["instruction_encoder"] is None and results["config"]["free_wordings"] == 0.0
    saved = json.loads((tmp_path / "qs" / "work" / "tagi" / "adapter_config.json").read_text())
    assert saved["instruction_encoder"] is None


def test_quickstart_names_the_base_models_it_knows(tmp_path, capsys):
    from peft_tagi.cli import parse_args

    with pytest.raises(SystemExit) as exit_:
        parse_args(["quickstart", "--fast", "--base-model", "t5-small", "--output-dir", str(tmp_path / "x")])
    assert exit_.value.code != 0 and "invalid choice: 't5-small'" in capsys.readouterr().err


def test_quickstart_without_its_instruction_encoder_names_the_way_out_before_any_stage(tmp_path):
    from peft_tagi.quickstart import QuickstartConfig, run_quickstart

    # As when the [encoder] extra is missing and the Hub cannot be reached: refused before anything is written.
    config = QuickstartConfig.fast(instruction_encoder=str(tmp_path / "no-such-encoder"))
    with pytest.raises(OSError, match=r"Cannot load the instruction encoder .*`--instruction-encoder none`"):
        run_quickstart(tmp_path / "qs", config)
    assert not (tmp_path / "qs").exists()


def test_quickstart_reruns_only_with_overwrite(tmp_path):
    from peft_tagi.quickstart import QuickstartConfig, run_quickstart

    micro = QuickstartConfig(**MICRO_QUICKSTART)
    run_quickstart(tmp_path / "qs", micro)
    first = (tmp_path / "qs" / "work" / "tagi" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        run_quickstart(tmp_path / "qs", micro)
    run_quickstart(tmp_path / "qs", dataclasses.replace(micro, seed=1), overwrite=True)
    assert (tmp_path / "qs" / "work" / "tagi" / "adapter_model.safetensors").read_bytes() != first
    assert json.loads((tmp_path / "qs" / "results.json").read_text())["config"]["seed"] == 1

    # Another run may reuse the base model, teachers and oracle of a finished one, never across other settings.
    variant = dataclasses.replace(micro, seed=1, lambda_kl=5.0, instruction_fusion=False, hypernetwork_hidden_size=24)
    results = run_quickstart(tmp_path / "variant", variant, reuse_from=tmp_path / "qs")
    assert results["reused_from"] == str(tmp_path / "qs") and not (tmp_path / "variant" / "work" / "base").exists()
    saved = json.loads((tmp_path / "variant" / "work" / "tagi" / "adapter_config.json").read_text())
    assert saved["hypernetwork_hidden_size"] == 24 and saved["instruction_fusion"] is False
    original = json.loads((tmp_path / "qs" / "results.json").read_text())
    for row in ("base", "oracle"):  # the very same models
        assert results["rows"][row]["rougeL"] == original["rows"][row]["rougeL"]
    # Distilled without ΔW alignment, the run trained no bank of parameter teachers, and the oracle (per-task LoRAs)
    # no meta-train LoRA: a variant that aligns ΔW cannot reuse its teachers.
    teachers = json.loads((tmp_path / "qs" / "work" / "teachers" / "teachers" / "teachers.json").read_text())
    oracle = json.loads((tmp_path / "qs" / "work" / "oracle" / "teachers" / "teachers.json").read_text())
    assert teachers["meta"] == "meta" and teachers["bank"] == {} and oracle["meta"] is None and len(oracle["bank"]) > 1
    aligned = dataclasses.replace(micro, seed=1, lambda_ins="sigmoid")
    with pytest.raises(ValueError, match=r"trained no bank of parameter teachers.*lambda_ins='sigmoid' needs one"):
        run_quickstart(tmp_path / "other", aligned, reuse_from=tmp_path / "qs")
    with pytest.raises(ValueError, match=r"other settings for \['seed'\]"):
        run_quickstart(tmp_path / "other", micro, reuse_from=tmp_path / "qs")
    with pytest.raises(FileNotFoundError, match="no finished quickstart"):
        run_quickstart(tmp_path / "other", micro, reuse_from=tmp_path / "missing")


def test_quickstart_oracle_does_not_depend_on_what_the_stages_before_it_drew(tmp_path, monkeypatch):
    import peft_tagi.quickstart as quickstart

    real_train_stage = quickstart.train_stage
    oracles = []
    for draws in (1, 10_000):

        def train_stage(model, tokenizer, args, *rest, draws=draws, **options):
            trained = real_train_stage(model, tokenizer, args, *rest, **options)
            if args.stage == "distill":
                torch.rand(draws)  # as a distillation on other instructions draws other amounts from the generator
            return trained

        monkeypatch.setattr(quickstart, "train_stage", train_stage)
        quickstart.run_quickstart(tmp_path / str(draws), quickstart.QuickstartConfig(**MICRO_QUICKSTART))
        folder = tmp_path / str(draws) / "work" / "oracle"
        oracles.append({p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*.safetensors"))})
    assert len(oracles[0]) >= 2 and oracles[0] == oracles[1]


def test_api_quickstart_example_runs_fast(tmp_path):
    proc = example("quickstart.py", "--fast", "--output-dir", str(tmp_path / "api"), timeout=900)
    assert "held-out ROUGE-L" in proc.stdout
    # Distillation with the quickstart's losses (references alone), not TagiTrainingArguments' paper defaults.
    distill_logs = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.startswith("distill:")]
    assert any("loss_ce=" in line for line in distill_logs), proc.stderr[-2000:]
    assert not any("loss_kl=" in line or "loss_ins=" in line for line in distill_logs)
    saved = json.loads((tmp_path / "api" / "tagi" / "adapter_config.json").read_text())
    assert saved["instruction_encoder"] == "sentence-transformers/all-MiniLM-L6-v2"  # as the quickstart's default
    assert len((ROOT / "examples" / "quickstart.py").read_text().splitlines()) < 80


# ---------------------------------------------------------------------------------------------------- predict
@pytest.fixture(scope="module")
def quickstart_dir(tmp_path_factory) -> Path:
    """A folder holding `tagi-quickstart/work/{base,tagi}` (a tiny T5), where the commands find their defaults."""
    root = tmp_path_factory.mktemp("user")
    quickstart_like_folder(root)
    return root


def test_predict_with_the_quickstart_defaults_and_unknown_words(quickstart_dir):
    proc = cli("predict", "--instruction", "reverse the words in French", "--input", "cat dog sun",
               "--input", "red tree", "--max-new-tokens", "4", cwd=quickstart_dir)  # fmt: skip
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and all(len(line.split()) == 4 for line in lines), proc.stdout
    assert "2 word(s) of the instruction are unknown to the tokenizer" in proc.stderr
    assert "'in', 'French'" in proc.stderr and "closed, word-level vocabulary" in proc.stderr
    # Another instruction writes another adapter, hence other outputs on the same inputs.
    other = cli("predict", "--instruction", "keep first two words", "--input", "cat dog sun", "--input", "red tree",
                "--max-new-tokens", "4", cwd=quickstart_dir)  # fmt: skip
    assert other.stdout != proc.stdout and "unknown" not in other.stderr


def test_predict_files_stdin_and_saved_adapters_agree(quickstart_dir, tmp_path):
    work = quickstart_dir / "tagi-quickstart" / "work"
    model = ["--model", str(work / "base"), "--tagi", str(work / "tagi")]
    inputs = ["cat dog sun", "red tree", "one two three", "fish bird"]
    jsonl = tmp_path / "inputs.jsonl"
    jsonl.write_text("".join(json.dumps({"input": x, "id": i}) + "\n" for i, x in enumerate(inputs)))
    proc = cli("predict", *model, "--instruction", "copy all the words", "--input-file", str(jsonl), "--batch-size",
               "3", "--max-new-tokens", "3", "--output", str(tmp_path / "out.jsonl"))  # fmt: skip
    assert "generating: 100%" in proc.stderr and "2/2" in proc.stderr  # two batches, with a progress bar
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [row["input"] for row in rows] == inputs
    assert {row["instruction"] for row in rows} == {"copy all the words"}
    assert all(len(row["output"].split()) == 3 for row in rows)

    # The same task as a saved adapter, inputs from stdin one per line: the same outputs, fusion included.
    cli("generate-adapter", "copy all the words", *model, "--out", str(tmp_path / "lora"))
    proc = cli("predict", *model, "--adapter", str(tmp_path / "lora"), "--input-file", "-", "--max-new-tokens", "3",
               stdin="\n".join(inputs) + "\n")  # fmt: skip
    assert proc.stdout.splitlines() == [row["output"] for row in rows]

    # Without its generator the folder runs as a plain PEFT LoRA, and says that this drops instruction fusion.
    proc = cli("predict", "--model", str(work / "base"), "--adapter", str(tmp_path / "lora"), "--input", "cat dog",
               "--max-new-tokens", "3")  # fmt: skip
    assert len(proc.stdout.split()) == 3 and "drops fusion" in proc.stderr


def test_generate_adapter_names_unknown_words_and_points_to_the_vocabulary(quickstart_dir, tmp_path):
    proc = cli("generate-adapter", "Translate to French.", "--out", str(tmp_path / "lora"),
               "--model", str(quickstart_dir / "tagi-quickstart/work/base"),
               "--tagi", str(quickstart_dir / "tagi-quickstart/work/tagi"))  # fmt: skip
    assert "'Translate', 'to', 'French'" in proc.stderr and "closed, word-level vocabulary" in proc.stderr
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()


def test_quickstart_show_vocabulary_lists_the_words_the_warning_points_to():
    from peft_tagi.data.synthetic import SyntheticSuite, suite_tokenizer
    from peft_tagi.tokenizer import unknown_words_message

    out = cli("quickstart", "--show-vocabulary").stdout
    words = out.splitlines()[-1].split()
    assert words == SyntheticSuite().vocabulary() and "reverse" in words
    message = unknown_words_message(suite_tokenizer(), "Translate to French.")
    assert "'Translate', 'French'" in message and "`peft-tagi quickstart --show-vocabulary`" in message


def test_predict_explains_missing_defaults_and_bad_input(tmp_path, quickstart_dir):
    proc = cli("predict", "--instruction", "reverse the words", "--input", "cat", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "run `peft-tagi quickstart` first" in proc.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "cat dog"}\n')
    proc = cli("predict", "--instruction", "reverse the words", "--input-file", str(bad), cwd=quickstart_dir,
               check=False)  # fmt: skip
    assert proc.returncode != 0 and 'line 1: a JSONL row needs a string field "input"' in proc.stderr


def test_task_adapter_from_instruction_warns_and_equals_generate_adapter(caplog):
    import torch
    from conftest import randomize_hypernetwork
    from peft import get_peft_model

    from peft_tagi import TagiConfig, TaskAdapter

    model = get_peft_model(tiny_t5(), TagiConfig(task_type="SEQ_2_SEQ_LM", r=4, instruction_fusion=True))
    randomize_hypernetwork(model)
    tokenizer = word_tokenizer()
    adapter = TaskAdapter.from_instruction(model, tokenizer, "reverse the words in French", generator="ckpt")
    assert "2 word(s) of the instruction are unknown" in caplog.text and "'in', 'French'" in caplog.text
    assert adapter.instruction == "reverse the words in French" and adapter.generator == "ckpt"
    ids = tokenizer(["reverse the words in French"], return_tensors="pt")
    [expected] = model.generate_adapter(ids["input_ids"], ids["attention_mask"])
    assert all(torch.equal(adapter.lora_B[name], expected.lora_B[name]) for name in expected.lora_B)
    caplog.clear()
    TaskAdapter.from_instruction(model, tokenizer, "reverse the words")
    assert "unknown" not in caplog.text
    with pytest.raises(ValueError, match="instruction is empty"):
        TaskAdapter.from_instruction(model, tokenizer, "  ")


def test_base_pretraining_cuts_half_the_demonstrations_at_output():
    """The base reads "step: words output:" and writes the result for about half the demonstrations; every other
    text is cut at a random word (a real forward/backward pass per step on a tiny T5)."""
    from peft_tagi.data.synthetic import SyntheticSuite, suite_tokenizer
    from peft_tagi.embedded_base import build_base_model, demonstration_texts, pretrain_base
    from peft_tagi.quickstart import QuickstartConfig

    suite = SyntheticSuite(seed=0)
    tokenizer = suite_tokenizer(suite)
    seen: list[list[str]] = []  # the texts of each tokenizer call: prefixes, targets, prefixes, ...

    def recording(texts, **kwargs):
        seen.append(list(texts))
        return tokenizer(texts, **kwargs)

    config = dataclasses.replace(QuickstartConfig.fast(), base_steps=6, batch_size=32)
    demos = demonstration_texts(suite, 200, seed=0)
    model = build_base_model(len(tokenizer), config.base())
    losses = pretrain_base(model, recording, demos, config.base())
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    prefixes = [p for batch in seen[0::2] for p in batch]
    targets = [t for batch in seen[1::2] for t in batch]
    at_output = [(p, t) for p, t in zip(prefixes, targets) if p.endswith(" output:")]
    assert 0.3 < len(at_output) / len(prefixes) < 0.7
    for prefix, target in at_output:
        assert f"{prefix} {target}" in demos  # the whole result is the target
    assert all(f"{p} {t}" in demos for p, t in zip(prefixes, targets))


def test_validation_split_leaves_out_training_tasks_and_never_touches_held_out_ones():
    from peft_tagi.data.synthetic import SyntheticSuite
    from peft_tagi.quickstart import split_tasks

    suite = SyntheticSuite(seed=0)
    assert split_tasks(suite) == (suite.train_tasks(), suite.heldout_tasks())
    train, left_out = split_tasks(suite, 12)
    assert len(left_out) == 12 and len(train) == len(suite.train_tasks()) - 12
    assert set(train) | set(left_out) == set(suite.train_tasks()) and not set(train) & set(left_out)
    assert not (set(train) | set(left_out)) & set(suite.heldout_tasks())
    assert len({t.primitives[0] for t in left_out}) >= 6  # spread over the primitives, not the first few tasks


def test_what_a_newcomer_tries_is_a_trained_kind_of_task_with_correct_expected_outputs():
    """The README's `predict` example and the demo's examples: two steps, trained under every quickstart seed 0-4,
    their expected outputs the suite's own answers; the README quotes the first one as it is."""
    from peft_tagi.data.synthetic import SyntheticSuite
    from peft_tagi.predict import QUICKSTART_EXAMPLES

    for instruction, inputs, expected in QUICKSTART_EXAMPLES:
        for seed in range(5):
            suite = SyntheticSuite(seed=seed)
            [task] = [t for t in suite.train_tasks() if instruction in t.instructions(train=True)]
            assert [task.apply(text.split()) for text in inputs] == list(expected)
    instruction, inputs, _ = QUICKSTART_EXAMPLES[0]
    command = f'peft-tagi predict --instruction "{instruction}" ' + " ".join(f'--input "{x}"' for x in inputs)
    assert command in (ROOT / "README.md").read_text()


def test_train_and_predict_with_a_separate_instruction_encoder(base_dir, tmp_path):
    """--instruction-encoder: the checkpoint names the encoder; predict reads the instruction with its tokenizer, so
    a word the base tokenizer lacks but the encoder's knows is not reported unknown."""
    import torch
    from conftest import WORDS
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(dict.fromkeys([*WORDS, "flip", "sequence"]))}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    encoder_tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=32))  # fmt: skip
    bert.save_pretrained(tmp_path / "encoder")
    encoder_tokenizer.save_pretrained(tmp_path / "encoder")

    common = ["--model", str(base_dir), "--data", "synthetic", "--max-instances", "2", "--r", "4", "--batch-size", "4",
              "--max-steps", "2", "--cpu", "--instruction-encoder", str(tmp_path / "encoder")]  # fmt: skip
    cli("train", "--stage", "pretrain", *common, "--output-dir", str(tmp_path / "p"))
    ckpt = tmp_path / "p" / "tagi"
    assert json.loads((ckpt / "adapter_config.json").read_text())["instruction_encoder"] == str(tmp_path / "encoder")
    proc = cli("predict", "--model", str(base_dir), "--tagi", str(ckpt), "--instruction", "flip the sequence",
               "--input", "cat dog sun", "--max-new-tokens", "3")  # fmt: skip
    assert len(proc.stdout.splitlines()) == 1 and "unknown" not in proc.stderr
    proc = cli("predict", "--model", str(base_dir), "--tagi", str(ckpt), "--instruction", "flip the zebra",
               "--input", "cat dog sun", "--max-new-tokens", "3")  # fmt: skip
    assert "'zebra'" in proc.stderr and "'flip'" not in proc.stderr
