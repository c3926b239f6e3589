"""The embedded default's base model: a small T5 built from random weights and pretrained on the suite's plain text.

TAGI starts from a pretrained base model (the paper's T5-LM-adapt); nothing can be downloaded here, so the
quickstart makes one: `build_base_model` gives the T5 of a `QuickstartConfig`'s shape, `pretrain_base` trains it by
prefix language modelling on word lists, facts and single-step demonstrations (`demonstration_texts`), never on a
task composition.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import T5Config, T5ForConditionalGeneration

from .data.synthetic import LEXICON, SyntheticSuite, render_output


@dataclass(frozen=True)
class EmbeddedBaseConfig:
    """Shape and pretraining budget of the embedded default's base model (`QuickstartConfig.base()` gives its own).

    Args:
        seed: seed of the initialisation and of the pretraining batches.
        d_model, num_layers, num_heads, d_ff: the T5's shape (as many decoder layers as encoder layers).
        base_steps: pretraining steps.
        base_learning_rate: AdamW learning rate (linear warm-up over 100 steps).
        batch_size: texts per step.
    """

    seed: int = 0
    d_model: int = 128
    num_layers: int = 3
    num_heads: int = 4
    d_ff: int = 512
    base_steps: int = 1500
    base_learning_rate: float = 1e-3
    batch_size: int = 32


def build_base_model(vocab_size: int, config: EmbeddedBaseConfig) -> T5ForConditionalGeneration:
    """A small T5 from random weights (no download)."""
    torch.manual_seed(config.seed)
    t5_config = T5Config(
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
    return T5ForConditionalGeneration(t5_config)


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


def pretrain_base(
    model: T5ForConditionalGeneration,
    tokenizer,
    texts: list[str],
    config: EmbeddedBaseConfig,
    output_cut: float = 0.5,
) -> list[float]:
    """Prefix language modelling on plain text: read a prefix, predict the rest (all weights train).

    This stands in for the C4 pretraining of the paper's T5-LM-adapt: the base learns the suite's language (words,
    facts, instructions) but never sees a task solved, so the frozen base alone cannot do the tasks.

    A fraction `output_cut` of the demonstrations (texts with `DEMONSTRATION_OUTPUT`) is cut right after "output:",
    so that the base reads a single step and a word list and writes the result, the encoder-decoder form the tasks
    take; every other text is cut at a random word. 0.5 against 0 was compared on left-out training tasks with
    `bench/base_pretraining.py` (README, "Absolute quality").
    """
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


__all__ = ["DEMONSTRATION_OUTPUT", "EmbeddedBaseConfig", "build_base_model", "demonstration_texts", "pretrain_base"]
