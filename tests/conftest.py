"""Tiny models built from configs (no download) and helpers shared by the tests."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

import peft_tagi  # noqa: F401  (registers TAGI)

VOCAB = 64
SHARED_SNI = Path(__file__).resolve().parents[2] / "shared" / "data" / "sni"


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return T5ForConditionalGeneration(config).eval()


def tiny_bart(seed: int = 0) -> BartForConditionalGeneration:
    torch.manual_seed(seed)
    config = BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
    )  # fmt: skip
    return BartForConditionalGeneration(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )  # fmt: skip
    return GPT2LMHeadModel(config).eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


BUILDERS = {"t5": tiny_t5, "bart": tiny_bart, "gpt2": tiny_gpt2, "llama": tiny_llama}
SEQ2SEQ = {"t5", "bart"}


def task_type(family: str) -> str:
    return "SEQ_2_SEQ_LM" if family in SEQ2SEQ else "CAUSAL_LM"


def randomize_hypernetwork(model, seed: int = 1, std: float = 0.05) -> None:
    """Give the (zero-initialised) B heads random weights so that generated adapters are not zero."""
    generator = torch.Generator().manual_seed(seed)
    hypernetworks = model.base_model.tagi_hypernetwork
    with torch.no_grad():
        for name, param in hypernetworks.named_parameters():
            if ".heads_B." in name:
                # The heads' outputs are multiplied by head_scale: undo it so that `std` is the scale of B's weights.
                head_scale = hypernetworks[name.split(".", 1)[0]].head_scale
                param.copy_(torch.randn(param.shape, generator=generator) * std / head_scale)


def make_batch(family: str, batch: int = 3, seq: int = 7, ins_len: int = 6, seed: int = 0) -> dict:
    """Random token batch: inputs, labels and one instruction per row (rows 0 and 1 get different instructions)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=generator)
    ins = torch.randint(3, VOCAB, (batch, ins_len), generator=generator)
    ins_mask = torch.ones_like(ins)
    if batch > 2:
        ins_mask[2, ins_len - 2 :] = 0
        ins[2, ins_len - 2 :] = 0
    out = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "instruction_input_ids": ins,
        "instruction_attention_mask": ins_mask,
    }
    if family in SEQ2SEQ:
        out["labels"] = torch.randint(3, VOCAB, (batch, 4), generator=generator)
    else:
        out["labels"] = ids.clone()
    return out


def run_python(
    code: str, cwd: Path | None = None, timeout: int = 240, check: bool = True
) -> subprocess.CompletedProcess:
    """Run code in a fresh Python process; with `check`, fail the test with its stderr when it fails."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        pytest.fail(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(autouse=True)
def torch_threads_restored():
    """Each test starts with the thread count this process started with. Bench workers set theirs
    (`torch.set_num_threads`); a test calling one in-process would otherwise leave it set for every later test, and a
    later test comparing this process's floats with a fresh process's (the default count) bitwise would fail: GEMMs
    split over another number of threads round differently in the last bits."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny T5 and the word tokenizer saved as a local model folder (what --model / --model_name_or_path take)."""
    path = tmp_path_factory.mktemp("base") / "tiny-t5"
    tiny_t5().save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def clone():
    return copy.deepcopy


WORDS = (
    "reverse the words keep first last two three drop copy all then and cat dog sun red blue tree milk fish "
    "bird green one word list output input task say"
).split()


def word_tokenizer():
    """A word-level tokenizer made in code: <pad>=0, </s>=1, <unk>=2, then WORDS (ids 3..); fits VOCAB."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def toy_examples(n_per_task: int = 4, seed: int = 0) -> list[dict]:
    """Four tiny word tasks in the one example format."""
    import random

    rng = random.Random(seed)
    nouns = "cat dog sun red blue tree milk fish bird green".split()
    tasks = {
        "reverse": ("reverse the words", lambda w: w[::-1], "order"),
        "first_two": ("keep first two words", lambda w: w[:2], "select"),
        "last_two": ("keep last two words", lambda w: w[-2:], "select"),
        "copy": ("copy all the words", lambda w: w, "order"),
    }
    rows = []
    for name, (instruction, fn, category) in tasks.items():
        for _ in range(n_per_task):
            words = rng.sample(nouns, 4)
            out = " ".join(fn(words))
            rows.append(
                {"task_name": name, "instruction": instruction, "input": " ".join(words), "output": out,
                 "category": category, "choices": [], "references": [out]}
            )  # fmt: skip
    return rows


def quickstart_like_folder(root: Path, fusion: bool = True) -> Path:
    """`root/tagi-quickstart/work/{base,tagi}` as `peft-tagi quickstart` lays it out, with a tiny T5 and WORDS.

    The base generates only words of WORDS (its generation config suppresses <pad>, </s>, <unk> and the ids the
    tokenizer lacks), so every output has `max_new_tokens` words and a test can see it; the hypernetwork is randomised so that the adapter changes the outputs.
    """
    from peft import get_peft_model
    from transformers import GenerationConfig

    from peft_tagi import TagiConfig

    work = root / "tagi-quickstart" / "work"
    base = tiny_t5()
    base.generation_config = GenerationConfig(
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        suppress_tokens=[0, 1, 2, *range(3 + len(set(WORDS)), VOCAB)],
    )  # fmt: skip
    base.save_pretrained(work / "base")
    word_tokenizer().save_pretrained(work / "base")
    config = TagiConfig(task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=8, instruction_fusion=fusion)
    model = get_peft_model(tiny_t5(), config)
    randomize_hypernetwork(model, std=0.5)
    model.save_pretrained(work / "tagi")
    return root / "tagi-quickstart"
