"""The embedded base model: the one shipped in the package, and the command that makes it, deterministically."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys

import pytest

from peft_tagi.data.synthetic import SyntheticSuite, suite_tokenizer
from peft_tagi.embedded_base import EMBEDDED_BASE_DIR, MAX_POSITIONS, RECIPE_NAME, SHIPPED, load_embedded_base


def test_the_shipped_base_is_what_its_recipe_says():
    recipe = json.loads((EMBEDDED_BASE_DIR / RECIPE_NAME).read_text())
    weights = EMBEDDED_BASE_DIR / "model.safetensors"
    assert weights.stat().st_size <= 20 * 2**20  # a small stand-in for a Hub checkpoint
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == recipe["model_sha256"]
    assert recipe["config"] == dataclasses.asdict(SHIPPED)  # made by the recipe in the code
    model, tokenizer, config = load_embedded_base()
    assert model.config.model_type == config.architecture == "bart" and not config.task_instructions
    assert sum(p.numel() for p in model.parameters()) == recipe["num_parameters"]
    # Every suite seed reads the same words, so one base serves every seed's split.
    for seed in range(5):
        assert tokenizer.get_vocab() == suite_tokenizer(SyntheticSuite(seed=seed)).get_vocab()
    assert tokenizer.model_max_length == MAX_POSITIONS == model.config.max_position_embeddings


def _build(folder, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "peft_tagi.embedded_base", "--out", str(folder), "--steps", "3", "--num-texts", "64",
         *extra],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip


def test_the_command_makes_the_same_base_in_two_fresh_processes_and_keeps_what_it_would_overwrite(tmp_path):
    first, second = _build(tmp_path / "a"), _build(tmp_path / "b")
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-2000:] + second.stderr[-2000:]
    recipes = [json.loads((tmp_path / name / RECIPE_NAME).read_text()) for name in ("a", "b")]
    assert recipes[0]["model_sha256"] == recipes[1]["model_sha256"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert recipes[0]["config"]["base_steps"] == 3 and "--steps 3 --num-texts 64" in recipes[0]["command"]
    model, _, config = load_embedded_base(tmp_path / "a")
    assert config.base_steps == 3 and model.config.model_type == "bart"

    again = _build(tmp_path / "a")
    assert again.returncode != 0 and "pass overwrite=True (or --overwrite)" in again.stderr
    assert json.loads((tmp_path / "a" / RECIPE_NAME).read_text()) == recipes[0]  # untouched


def test_a_missing_base_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m peft_tagi.embedded_base --out"):
        load_embedded_base(tmp_path)
