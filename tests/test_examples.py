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
from conftest import SHARED_SNI

ROOT = Path(__file__).resolve().parents[1]
# Flags every run below shares: few steps, a checkpoint every 2 steps, and the two features big runs need.
TINY = [
    "--r", "4", "--lora_alpha", "8", "--hypernetwork_hidden_size", "16", "--module_embedding_dim", "8",
    "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--logging_steps", "1", "--save_steps", "2",
    "--report_to", "none", "--use_cpu", "--disable_tqdm", "true", "--seed", "0",
    "--gradient_checkpointing", "--bf16",
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


# ---------------------------------------------------------------- accelerate configs (FSDP, DeepSpeed)
# FSDP and DeepSpeed need GPUs: on the CPU accelerate keeps the MULTI_CPU distributed type, does not apply the FSDP
# plugin and the Trainer runs DDP. These tests check that each shipped config is what accelerate and the Trainer
# accept; sharded training itself is not run here.
ACCELERATE = ROOT / "examples" / "accelerate"


def launch_args(config: Path):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(config), "examples/train_sni.py"])
    return _validate_launch_command(args)[0]


def test_fsdp_config_is_accepted_by_accelerate_and_the_trainer(monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    from peft_tagi import TagiTrainingArguments

    config = load_config_from_file(str(ACCELERATE / "fsdp.yaml"))
    assert config.distributed_type == "FSDP" and config.fsdp_config["fsdp_version"] == 2
    # What `accelerate launch --config_file` hands the processes, and the plugin they build from it.
    env = prepare_multi_gpu_env(launch_args(ACCELERATE / "fsdp.yaml"))
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.transformer_cls_names_to_wrap == ["T5Block"]
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)
    # The same options as the Trainer's --fsdp / --fsdp_config.
    args = TagiTrainingArguments(
        output_dir="unused", fsdp=True, fsdp_config=dict(config.fsdp_config), use_cpu=True, report_to="none"
    )
    assert args.fsdp_plugin_args["fsdp_version"] == 2
    assert args.fsdp_plugin_args["transformer_cls_names_to_wrap"] == "T5Block"
    assert args.fsdp_plugin_args["state_dict_type"] == "FULL_STATE_DICT"
    FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs_are_accepted(stage):
    import importlib.util

    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ACCELERATE / f"deepspeed_zero{stage}.yaml"))
    assert config.distributed_type == "DEEPSPEED"
    ds_file = ROOT / config.deepspeed_config["deepspeed_config_file"]
    args = launch_args(ACCELERATE / f"deepspeed_zero{stage}.yaml")
    assert args.use_deepspeed and Path(args.deepspeed_config_file) == ds_file.relative_to(ROOT)
    assert json.loads(ds_file.read_text())["zero_optimization"]["stage"] == stage
    if importlib.util.find_spec("deepspeed") is None:
        return  # DeepSpeed is not a dependency: the JSON is checked above, the Trainer's reading of it needs it
    from peft_tagi import TagiTrainingArguments

    training_args = TagiTrainingArguments(output_dir="unused", deepspeed=str(ds_file), report_to="none")
    assert training_args.hf_deepspeed_config.config["zero_optimization"]["stage"] == stage
    assert training_args.hf_deepspeed_config.is_zero3() == (stage == 3)


def test_fsdp_on_two_cpu_processes_is_refused_rather_than_run_as_ddp(tmp_path):
    """On the CPU accelerate drops the FSDP plugin and the Trainer would train DDP; TagiTrainer says so instead."""
    script = tmp_path / "fsdp.py"
    script.write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT / 'tests')!r})\n"
        "from conftest import tiny_t5, word_tokenizer\n"
        "from peft import get_peft_model\n"
        "from peft_tagi import TagiConfig, TagiTrainer, TagiTrainingArguments\n"
        "model = get_peft_model(tiny_t5(), TagiConfig(task_type='SEQ_2_SEQ_LM', r=4, hypernetwork_hidden_size=16))\n"
        f"args = TagiTrainingArguments(output_dir={str(tmp_path / 'out')!r}, stage='pretrain', use_cpu=True,\n"
        "                              fsdp=True, fsdp_config={'version': 2}, report_to='none')\n"
        "TagiTrainer(model=model, args=args, processing_class=word_tokenizer())\n"
    )
    # `--multi_gpu` makes accelerate start 2 ranks with torchrun; use_cpu=True puts them on gloo.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script)]  # fmt: skip
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode != 0
    assert "FSDP was requested but accelerate did not enable it (DistributedType.MULTI_CPU)" in proc.stderr
