"""The `peft-tagi` command and the examples, run as a user would: in fresh processes, on tiny local models."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_t5, word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ["train", "generate-adapter", "export", "evaluate", "quickstart"]


def cli(*args: str, timeout: int = 300, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "peft_tagi.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
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


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny T5 and a word tokenizer saved as a local model folder (what --model takes)."""
    path = tmp_path_factory.mktemp("base") / "tiny-t5"
    tiny_t5().save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def test_help_everywhere():
    assert "train" in cli("--help").stdout
    for name in SUBCOMMANDS:
        out = cli(name, "--help").stdout
        assert "usage: peft-tagi " + name in out


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
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"stage": "teachers", "learning_rat": 0.1}))
    proc = cli("train", "--config", str(config), "--model", str(base_dir), "--output-dir", str(tmp_path / "o"),
               check=False)  # fmt: skip
    assert proc.returncode != 0 and "unknown options ['learning_rat']" in proc.stderr
    proc = cli("train", "--config", str(tmp_path / "missing.yaml"), "--model", str(base_dir), check=False)
    assert proc.returncode != 0 and "config file" in proc.stderr and "not found" in proc.stderr


def test_quickstart_fast_writes_the_report(tmp_path):
    proc = cli("quickstart", "--fast", "--seed", "3", "--output-dir", str(tmp_path / "qs"), timeout=600)
    results = json.loads((tmp_path / "qs" / "results.json").read_text())
    assert results["config"]["seed"] == 3
    swap = results["instruction_swap"]
    assert {"given_instruction", "own_task"} == set(swap) and "instruction swap" in proc.stdout
    assert set(results["training_tasks"]) == {"meta_teacher", "tagi"} and "training tasks" in proc.stdout
    assert set(results["rows"]) == {"base", "meta_teacher", "tagi", "tagi_plain_lora", "oracle"}
    for row in results["rows"].values():
        assert {"rougeL", "exact_match", "ms_per_instance"} <= set(row)
    assert (tmp_path / "qs" / "results.png").stat().st_size > 1000
    assert "TAGI generated adapter (fusion)" in proc.stdout
    assert sum(results["timings_s"].values()) < 120


def test_quickstart_reruns_only_with_overwrite(tmp_path):
    from peft_tagi.quickstart import QuickstartConfig, run_quickstart

    micro = QuickstartConfig(
        d_model=32, num_layers=1, d_ff=64, r=2, lora_alpha=4, train_instances=2, eval_instances=1,
        oracle_instances=2, base_steps=2, teacher_steps=2, pretrain_steps=1, distill_steps=2, oracle_steps=1,
        batch_size=8,
    )  # fmt: skip
    run_quickstart(tmp_path / "qs", micro)
    first = (tmp_path / "qs" / "work" / "tagi" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        run_quickstart(tmp_path / "qs", micro)
    run_quickstart(tmp_path / "qs", dataclasses.replace(micro, seed=1), overwrite=True)
    assert (tmp_path / "qs" / "work" / "tagi" / "adapter_model.safetensors").read_bytes() != first
    assert json.loads((tmp_path / "qs" / "results.json").read_text())["config"]["seed"] == 1


def test_api_quickstart_example_runs_fast(tmp_path):
    proc = example("quickstart.py", "--fast", "--output-dir", str(tmp_path / "api"))
    assert "held-out ROUGE-L" in proc.stdout
    assert (tmp_path / "api" / "tagi" / "adapter_config.json").is_file()
    assert len((ROOT / "examples" / "quickstart.py").read_text().splitlines()) < 80
