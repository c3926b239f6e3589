"""examples/train_sni.py and examples/train_p3.py run as a user runs them: fresh processes, tiny local model and data,
Trainer flags from the command line, checkpoints per stage, and a stopped run resumed from its checkpoint."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import SHARED_SNI, tiny_t5, word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
# Flags every run below shares: few steps, a checkpoint every 2 steps, and the two features big runs need.
TINY = [
    "--r", "4", "--lora_alpha", "8", "--hypernetwork_hidden_size", "16", "--module_embedding_dim", "8",
    "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--logging_steps", "1", "--save_steps", "2",
    "--report_to", "none", "--use_cpu", "--disable_tqdm", "true", "--seed", "0",
    #"--gradient_checkpointing", "--bf16",
]  # fmt: skip
STEPS = ["--teachers_steps", "2", "--pretrain_steps", "2", "--distill_steps", "4"]


def run_example(name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args], capture_output=True, text=True, timeout=600, env=env
    )
    if check and proc.returncode != 0:
        pytest.fail(f"examples/{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny T5 and the word tokenizer saved as a local model folder (what --model_name_or_path takes)."""
    path = tmp_path_factory.mktemp("base") / "tiny-t5"
    tiny_t5().save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def write_sni(root: Path) -> Path:
    """Three train tasks and one test task in the allenai/natural-instructions layout."""
    nouns = "cat dog sun red blue tree milk fish bird green".split()
    tasks = {
        "task001_reverse": ("reverse the words", lambda w: w[::-1]),
        "task002_first_two": ("keep first two words", lambda w: w[:2]),
        "task003_last_two": ("keep last two words", lambda w: w[-2:]),
        "task004_copy": ("copy all the words", lambda w: w),
    }
    (root / "tasks").mkdir(parents=True)
    (root / "splits" / "default").mkdir(parents=True)
    for i, (name, (definition, fn)) in enumerate(tasks.items()):
        instances = []
        for j in range(4):
            words = [nouns[(i + j + k) % len(nouns)] for k in range(4)]
            instances.append({"id": f"{name}-{j}", "input": " ".join(words), "output": [" ".join(fn(words))]})
        task = {
            "Definition": [definition], "Positive Examples": [], "Categories": ["word order"], "Instances": instances,
            "Input_language": ["English"], "Output_language": ["English"], "Instruction_language": ["English"],
        }  # fmt: skip
        (root / "tasks" / f"{name}.json").write_text(json.dumps(task))
    names = list(tasks)
    (root / "splits" / "default" / "train_tasks.txt").write_text("\n".join(names[:3]) + "\n")
    (root / "splits" / "default" / "test_tasks.txt").write_text(names[3] + "\n")
    return root


def global_step(folder: Path) -> int:
    return json.loads((folder / "trainer_state.json").read_text())["global_step"]


def test_train_sni_checkpoints_every_stage_and_resumes_a_stopped_run(base_dir, tmp_path):
    sni, out = write_sni(tmp_path / "sni"), tmp_path / "out"
    args = ["--sni_dir", str(sni), "--model_name_or_path", str(base_dir), "--output_dir", str(out),
            "--max_eval_instances_per_task", "2", "--generation_max_length", "4", *TINY, *STEPS]  # fmt: skip
    first = run_example("train_sni.py", *args)
    assert "SNI test tasks: ROUGE-L" in first.stdout
    for stage, steps in (("teachers", 2), ("pretrain", 2), ("distill", 4)):
        assert global_step(out / stage) == steps, stage
        assert (out / stage / "checkpoint-2" / "adapter_model.safetensors").is_file(), stage
    assert (out / "teachers" / "teachers" / "teachers.json").is_file()
    assert json.loads((out / "distill" / "adapter_config.json").read_text())["peft_type"] == "TAGI"
    trained = (out / "distill" / "adapter_model.safetensors").read_bytes()

    # A run stopped after distill's checkpoint-2: its newer checkpoint and its final output are gone.
    shutil.rmtree(out / "distill" / "checkpoint-4")
    for entry in (out / "distill").iterdir():
        if not entry.name.startswith("checkpoint-"):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    # A fresh run over it is refused; --resume_from_checkpoint continues it.
    refused = run_example("train_sni.py", *args, check=False)
    assert refused.returncode != 0 and "--resume_from_checkpoint" in refused.stderr
    resumed = run_example("train_sni.py", *args, "--resume_from_checkpoint")
    log = resumed.stdout + resumed.stderr
    assert re.search(r"Stage teachers: complete in .*; skipped", log)
    assert re.search(r"Stage pretrain: complete in .*; skipped", log)
    assert re.search(r"Stage distill: resuming from .*distill/checkpoint-2", log)
    assert re.search(r"Resuming training from checkpoint with epoch \d+ and global step 2\b", log)
    assert global_step(out / "distill") == 4
    assert (out / "distill" / "checkpoint-4").is_dir()
    # On the CPU the resumed run ends with the very weights of the uninterrupted one.
    assert (out / "distill" / "adapter_model.safetensors").read_bytes() == trained
    assert "SNI test tasks: ROUGE-L" in resumed.stdout


def test_train_p3_from_a_yaml_file_resumes_an_interrupted_teachers_stage(base_dir, tmp_path):
    import datasets

    words = "cat dog sun red blue tree milk fish bird green".split()
    for name, choices in (("rte_gpt3", ["yes", "no"]), ("copa_choose", ["cat", "dog"])):
        prompts = [" ".join(words[i : i + 6]) + " say yes or no ?" for i in range(4)]
        rows = {
            "inputs_pretokenized": prompts,
            "targets_pretokenized": [choices[i % 2] for i in range(4)],
            "answer_choices": [choices] * 4,
        }
        datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "p3" / name))
    out = tmp_path / "out"
    options = {
        "p3": str(tmp_path / "p3"), "train_subsets": ["rte_gpt3"], "eval_subset": "copa_choose",
        "model_name_or_path": str(base_dir), "output_dir": str(out),
        "teachers_steps": 4, "pretrain_steps": 2, "distill_steps": 2, "lambda_ins": "0.5",
    }  # fmt: skip
    flags = iter(TINY)
    for flag in flags:  # the same options as TINY, the way a YAML file spells them
        value = (
            yaml.safe_load(next(flags)) if flag not in ("--gradient_checkpointing", "--bf16", "--use_cpu") else True
        )
        options[flag[2:]] = value
    config = tmp_path / "args.yaml"
    config.write_text(yaml.safe_dump(options))
    first = run_example("train_p3.py", str(config))
    assert "copa_choose: rank-classification accuracy" in first.stdout
    state = json.loads((out / "distill" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert json.loads((out / "teachers" / "trainer_state.json").read_text())["global_step"] == 4

    # Stopped in the teachers stage after checkpoint-2: only that checkpoint is left.
    for stage in ("pretrain", "distill"):
        shutil.rmtree(out / stage)
    for entry in (out / "teachers").iterdir():
        if entry.name != "checkpoint-2":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    config.write_text(yaml.safe_dump({**options, "resume_from_checkpoint": "true"}))
    resumed = run_example("train_p3.py", str(config))
    log = resumed.stdout + resumed.stderr
    assert re.search(r"Stage teachers: resuming from .*teachers/checkpoint-2", log)
    assert re.search(r"Resuming training from checkpoint with epoch \d+ and global step 2\b", log)
    assert global_step(out / "teachers") == 4 and global_step(out / "distill") == 2
    assert (out / "teachers" / "teachers" / "teachers.json").is_file()


def test_bad_arguments_are_explained(base_dir, tmp_path):
    sni = write_sni(tmp_path / "sni")
    common = ["--sni_dir", str(sni), "--model_name_or_path", str(base_dir), "--output_dir", str(tmp_path / "o")]
    proc = run_example("train_sni.py", *common, *TINY, *STEPS, "--distill_step", "3", check=False)
    assert proc.returncode != 0 and "--distill_step" in proc.stderr  # not taken as an abbreviation of --distill_steps
    proc = run_example("train_sni.py", *common, "--pretrain_steps", "-1", check=False)
    assert proc.returncode != 0 and "--pretrain_steps must be >= 0" in proc.stderr
    proc = run_example("train_sni.py", *common, "--resume_from_checkpoint", str(tmp_path / "x" / "checkpoint-2"),
                       *TINY, *STEPS, check=False)  # fmt: skip
    assert proc.returncode != 0 and "is not a checkpoint of this run" in proc.stderr


@pytest.mark.skipif(not SHARED_SNI.is_dir(), reason="../shared/data/sni (the SNI slice) is absent")
def test_train_sni_on_the_real_slice(base_dir, tmp_path):
    proc = run_example("train_sni.py", "--sni_dir", str(SHARED_SNI), "--model_name_or_path", str(base_dir),
                       "--output_dir", str(tmp_path / "sni"), "--max_train_instances_per_task", "2",
                       "--max_eval_instances_per_task", "1", "--generation_max_length", "4",
                       "--teachers_steps", "1", "--pretrain_steps", "1", "--distill_steps", "1", *TINY)  # fmt: skip
    assert "SNI test tasks: ROUGE-L" in proc.stdout
