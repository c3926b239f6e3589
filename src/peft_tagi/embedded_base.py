"""The embedded default's base model: a small seq2seq model pretrained on the synthetic suite's plain text.

TAGI starts from a pretrained base model (the paper's T5-LM-adapt); nothing can be downloaded here, so the project
makes one. Two ways:

- **shipped** (the quickstart's default): a small BART (learned absolute positions) pretrained
  once by `python -m peft_tagi.embedded_base --out src/peft_tagi/embedded`, stored in the package as safetensors with
  its tokenizer and its recipe (`recipe.json`), loaded by `load_embedded_base`. It stands in for the Hub checkpoint a
  real user starts from. Its pretraining text holds word lists, facts and single steps only, nothing that depends on
  which tasks a suite seed holds out, so one base serves every seed. Its teachers and oracle beat the from-scratch
  T5's; TAGI learns on it when a pretrained sentence encoder reads the instructions (the quickstart's
  `instruction_encoder="minilm"`), not through the BART's own encoder (docs/quality.md, "The shipped base").
- **from scratch** (`peft-tagi quickstart --base-model from-scratch`, the default before): a small T5 built from
  random weights and pretrained inside the run, on text that also holds the split's two-step training instructions.

`pretrain_base` is the same prefix language modelling for both: read a prefix, predict the rest; single-step
demonstrations ("reverse the words: cat dog output: dog cat.") are cut right after "output:" half of the time. No
task composition is ever shown solved.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    PreTrainedModel,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.utils import logging

from .data.synthetic import LEXICON, SyntheticSuite, render_output, suite_tokenizer

logger = logging.get_logger(__name__)

# The shipped base: model.safetensors, config.json, the tokenizer's files and recipe.json.
EMBEDDED_BASE_DIR = Path(__file__).resolve().parent / "embedded"
RECIPE_NAME = "recipe.json"
# Positions of a BART base: four times the longest text of the suite (an instruction and seven words, ~30 tokens).
MAX_POSITIONS = 128
# The linear layers every LoRA of the quickstart targets, per architecture: all of attention and the feed-forward.
TARGET_MODULES = {
    "t5": ("q", "k", "v", "o", "wi", "wo"),
    "bart": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
}


@dataclass(frozen=True)
class EmbeddedBaseConfig:
    """Architecture, shape and pretraining recipe of an embedded base model.

    Args:
        seed: seed of the initialisation, of the pretraining text and of its batches.
        architecture: `"t5"` (relative position biases in self-attention only) or `"bart"` (learned absolute
            positions in encoder and decoder).
        d_model, num_layers, num_heads, d_ff: the shape (as many decoder layers as encoder layers).
        base_steps: pretraining steps.
        base_learning_rate: AdamW learning rate (linear warm-up over 100 steps, then constant).
        batch_size: texts per step.
        output_cut: fraction of the single-step demonstrations cut right after "output:" (the others are cut at a
            random word, as every other text).
        task_instructions: whether the text also holds the suite's two-step training instructions (not solved).
            They depend on the suite seed's split, so a base shared by all seeds leaves them out.
        num_texts: plain texts and as many demonstrations drawn for pretraining.
    """

    seed: int = 0
    architecture: Literal["t5", "bart"] = "t5"
    d_model: int = 128
    num_layers: int = 3
    num_heads: int = 4
    d_ff: int = 512
    base_steps: int = 1500
    base_learning_rate: float = 1e-3
    batch_size: int = 32
    output_cut: float = 0.5
    task_instructions: bool = True
    num_texts: int = 20000

    def __post_init__(self) -> None:
        if self.architecture not in TARGET_MODULES:
            raise ValueError(
                f"EmbeddedBaseConfig.architecture must be one of {sorted(TARGET_MODULES)}, got {self.architecture!r}."
            )
        if not 0.0 <= self.output_cut <= 1.0:
            raise ValueError(f"EmbeddedBaseConfig.output_cut must be in [0, 1], got {self.output_cut!r}.")

    @property
    def target_modules(self) -> tuple[str, ...]:
        return TARGET_MODULES[self.architecture]


# The shipped base's recipe (chosen on left-out training tasks: docs/quality.md, "The base model").
SHIPPED = EmbeddedBaseConfig(architecture="bart", base_steps=20000, task_instructions=False)


def build_base_model(vocab_size: int, config: EmbeddedBaseConfig) -> PreTrainedModel:
    """A base model of `config`'s architecture and shape from random weights (no download)."""
    torch.manual_seed(config.seed)
    if config.architecture == "bart":
        return BartForConditionalGeneration(
            BartConfig(
                vocab_size=vocab_size,
                d_model=config.d_model,
                encoder_layers=config.num_layers,
                decoder_layers=config.num_layers,
                encoder_attention_heads=config.num_heads,
                decoder_attention_heads=config.num_heads,
                encoder_ffn_dim=config.d_ff,
                decoder_ffn_dim=config.d_ff,
                max_position_embeddings=MAX_POSITIONS,
                dropout=0.0,
                attention_dropout=0.0,
                activation_dropout=0.0,
                # The word tokenizer's ids: pad 0 (also the decoder start, as in T5), eos 1; no <s> is prepended.
                pad_token_id=0,
                eos_token_id=1,
                bos_token_id=1,
                decoder_start_token_id=0,
                forced_eos_token_id=None,
                scale_embedding=False,
            )
        )
    return T5ForConditionalGeneration(
        T5Config(
            vocab_size=vocab_size,
            d_model=config.d_model,
            d_kv=config.d_model // config.num_heads,
            d_ff=config.d_ff,
            num_layers=config.num_layers,
            num_decoder_layers=config.num_layers,
            num_heads=config.num_heads,
            dropout_rate=0.0,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
            tie_word_embeddings=True,
        )
    )


DEMONSTRATION_OUTPUT = " output: "


def demonstration_texts(suite: SyntheticSuite, n: int, seed: int) -> list[str]:
    """Texts showing single steps done on word lists, with training phrasings only."""
    rng = random.Random(f"demonstrations-{seed}")
    texts = []
    for _ in range(n):
        primitive = rng.choice(suite.primitives)
        words = rng.sample(LEXICON, rng.randint(3, 7))
        output = render_output(primitive.fn(list(words)))
        texts.append(f"{rng.choice(primitive.phrasings)}: {' '.join(words)}{DEMONSTRATION_OUTPUT}{output}.")
    return texts


def pretraining_corpus(suite: SyntheticSuite, config: EmbeddedBaseConfig, demonstrations: bool = True) -> list[str]:
    """The base's pretraining text: `config.num_texts` plain texts, and as many single-step demonstrations."""
    texts = suite.pretraining_texts(config.num_texts, seed=config.seed, task_instructions=config.task_instructions)
    return texts + (demonstration_texts(suite, config.num_texts, config.seed) if demonstrations else [])


def pretrain_base(
    model: PreTrainedModel,
    tokenizer,
    texts: list[str],
    config: EmbeddedBaseConfig,
    output_cut: float | None = None,
) -> list[float]:
    """Prefix language modelling on plain text: read a prefix, predict the rest (all weights train).

    This stands in for the C4 pretraining of the paper's T5-LM-adapt: the base learns the suite's language (words,
    facts, instructions) but never sees a task solved, so the frozen base alone cannot do the tasks.

    A fraction `output_cut` (default `config.output_cut`) of the demonstrations (texts with `DEMONSTRATION_OUTPUT`)
    is cut right after "output:", so that the base reads a single step and a word list and writes the result, the
    encoder-decoder form the tasks take; every other text is cut at a random word. 0.5 against 0 was compared on
    left-out training tasks with `python -m bench.base_pretraining` (docs/quality.md, "The base model").

    Returns the loss of every step.
    """
    output_cut = config.output_cut if output_cut is None else output_cut
    rng = random.Random(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.base_learning_rate, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 100))
    model.train()
    losses = []
    for _ in tqdm(range(config.base_steps), desc="base pretraining", leave=False):
        prefixes, targets = [], []
        for text in rng.sample(texts, config.batch_size):
            if DEMONSTRATION_OUTPUT in text and rng.random() < output_cut:
                prefix, target = text.split(DEMONSTRATION_OUTPUT, 1)
                prefixes.append(prefix + DEMONSTRATION_OUTPUT.rstrip())
                targets.append(target)
                continue
            words = text.split()
            cut = rng.randint(1, max(1, len(words) - 1))
            prefixes.append(" ".join(words[:cut]))
            targets.append(" ".join(words[cut:]))
        enc = tokenizer(prefixes, padding=True, truncation=True, max_length=64, return_tensors="pt").to(model.device)
        lab = tokenizer(targets, padding=True, truncation=True, max_length=64, return_tensors="pt").to(model.device)
        labels = lab["input_ids"].masked_fill(lab["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def build_embedded_base(out: str | Path, config: EmbeddedBaseConfig = SHIPPED, overwrite: bool = False) -> dict:
    """Make a base model by `config`'s recipe and save it, its tokenizer and `recipe.json` to `out`.

    The same recipe on the same machine and thread count gives the same bytes (every random draw is seeded); another
    CPU may round differently. Returns the recipe record written to `recipe.json` (the config, the steps' wall time,
    the last losses and the weights' SHA-256).
    """
    from .serialization import atomic_write_dir

    suite = SyntheticSuite(seed=config.seed)
    # Truncation at the base's positions, so that a longer text is cut rather than read past the last position.
    tokenizer = suite_tokenizer(suite, model_max_length=MAX_POSITIONS if config.architecture == "bart" else 512)
    start = time.perf_counter()
    model = build_base_model(len(tokenizer), config)
    losses = pretrain_base(model, tokenizer, pretraining_corpus(suite, config), config)
    seconds = time.perf_counter() - start
    record = {
        "command": (
            f"python -m peft_tagi.embedded_base --out {out} --seed {config.seed} --steps {config.base_steps} "
            f"--num-texts {config.num_texts} --threads {torch.get_num_threads()}"
        ),
        "config": dataclasses.asdict(config),
        "wall_seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "final_loss": round(sum(losses[-100:]) / max(1, len(losses[-100:])), 4),
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record["model_sha256"] = hashlib.sha256((tmp / "model.safetensors").read_bytes()).hexdigest()
        (tmp / RECIPE_NAME).write_text(json.dumps(record, indent=2) + "\n")

    atomic_write_dir(Path(out), write, overwrite=overwrite)
    return record


def load_embedded_base(folder: str | Path = EMBEDDED_BASE_DIR) -> tuple[PreTrainedModel, object, EmbeddedBaseConfig]:
    """The shipped base model (or one written by `build_embedded_base`), its tokenizer and its recipe."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    folder = Path(folder)
    recipe = folder / RECIPE_NAME
    if not recipe.is_file():
        raise FileNotFoundError(
            f"{folder} holds no embedded base ({RECIPE_NAME} is missing). Reinstall peft-tagi, or make one with "
            f"`python -m peft_tagi.embedded_base --out {folder}`."
        )
    config = EmbeddedBaseConfig(**json.loads(recipe.read_text())["config"])
    model = AutoModelForSeq2SeqLM.from_pretrained(folder).eval()
    return model, AutoTokenizer.from_pretrained(folder), config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m peft_tagi.embedded_base",
        description="Make the embedded base model by the shipped recipe (SHIPPED in peft_tagi.embedded_base).",
    )
    parser.add_argument("--out", required=True, help="folder to write (the package's: src/peft_tagi/embedded)")
    parser.add_argument("--seed", type=int, default=SHIPPED.seed)
    parser.add_argument("--steps", type=int, default=SHIPPED.base_steps, help="pretraining steps")
    parser.add_argument(
        "--num-texts",
        type=int,
        default=SHIPPED.num_texts,
        help="plain texts, and as many demonstrations, to draw from",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (the same count reproduces the same bytes)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import logging as std_logging

    std_logging.basicConfig(level=std_logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = dataclasses.replace(SHIPPED, seed=args.seed, base_steps=args.steps, num_texts=args.num_texts)
    record = build_embedded_base(args.out, config, overwrite=args.overwrite)
    logger.info(
        f"Wrote {args.out}: {json.dumps({k: record[k] for k in ('wall_seconds', 'final_loss', 'model_sha256')})}"
    )


if __name__ == "__main__":
    main()


__all__ = [
    "DEMONSTRATION_OUTPUT",
    "EMBEDDED_BASE_DIR",
    "SHIPPED",
    "TARGET_MODULES",
    "EmbeddedBaseConfig",
    "build_base_model",
    "build_embedded_base",
    "demonstration_texts",
    "load_embedded_base",
    "pretrain_base",
    "pretraining_corpus",
]
