"""`TaskAdapter`: the LoRA weights generated for one task, exportable as a standard PEFT LoRA folder."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from .hub import default_api, download_folder, generated_lora_card, upload_with_card
from .serialization import atomic_write_dir, load_safetensors
from .tokenizer import warn_unknown_words

if TYPE_CHECKING:
    from huggingface_hub import HfApi

LORA_WEIGHTS_NAME = "adapter_model.safetensors"
LORA_CONFIG_NAME = "adapter_config.json"
INSTRUCTION_STATES_NAME = "tagi_instruction_states.safetensors"
TAGI_ADAPTER_NAME = "tagi_adapter.json"
# The files `TaskAdapter.load` reads; a pull downloads only these (not the README or anything else in the repo).
TASK_ADAPTER_FILES = [LORA_CONFIG_NAME, LORA_WEIGHTS_NAME, TAGI_ADAPTER_NAME, INSTRUCTION_STATES_NAME]
_KEY_PREFIX = "base_model.model."


@dataclass
class TaskAdapter:
    """LoRA weights written for one task, plus (with instruction fusion) the task's encoded instruction.

    Args:
        lora_A (`dict[str, Tensor]`): module path in the base model -> A, shape (r, in_features).
        lora_B (`dict[str, Tensor]`): module path in the base model -> B, shape (out_features, r).
        r (`int`): LoRA rank.
        lora_alpha (`float`): LoRA alpha; the update is `lora_alpha / r * B @ A`.
        task_type (`str`): PEFT task type of the model it was generated for (`SEQ_2_SEQ_LM` or `CAUSAL_LM`).
        fan_in_fan_out (`bool`): True when the targeted layers store weights as (in, out), as GPT-2's Conv1D does.
        instruction_states (`Tensor`, *optional*): encoded instruction tokens, shape (S, d_model); present when the
            generator uses instruction fusion.
        instruction (`str`, *optional*): the instruction text, when known.
        base_model_name_or_path (`str`, *optional*): the base model the adapter belongs to.
        generator (`str`, *optional*): the TAGI checkpoint that generated it, when known.
        instruction_encoder (`str`, *optional*): the separate encoder that read the instruction
            (`TagiConfig.instruction_encoder`), None for the base model's own. Serving the adapter does not need it:
            with fusion, `instruction_states` are already in the base model's width.
    """

    lora_A: dict[str, torch.Tensor]
    lora_B: dict[str, torch.Tensor]
    r: int
    lora_alpha: float
    task_type: str
    fan_in_fan_out: bool = False
    instruction_states: torch.Tensor | None = None
    instruction: str | None = None
    base_model_name_or_path: str | None = None
    generator: str | None = None
    metadata: dict = field(default_factory=dict)
    instruction_encoder: str | None = None

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    @property
    def target_modules(self) -> list[str]:
        return sorted(self.lora_A)

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW of one module, (out_features, in_features)."""
        return self.scaling * self.lora_B[name] @ self.lora_A[name]

    def to(self, device: torch.device | str) -> TaskAdapter:
        move = {k: v.to(device) for k, v in self.lora_A.items()}, {k: v.to(device) for k, v in self.lora_B.items()}
        states = None if self.instruction_states is None else self.instruction_states.to(device)
        return TaskAdapter(
            move[0], move[1], self.r, self.lora_alpha, self.task_type, self.fan_in_fan_out, states,
            self.instruction, self.base_model_name_or_path, self.generator, dict(self.metadata),
            self.instruction_encoder,
        )  # fmt: skip

    def lora_config(self, base_model_name_or_path: str | None = None):
        """The `peft.LoraConfig` under which plain PEFT reproduces these weights."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.lora_alpha,
            target_modules=self.target_modules,
            lora_dropout=0.0,
            fan_in_fan_out=self.fan_in_fan_out,
            task_type=self.task_type,
            base_model_name_or_path=base_model_name_or_path or self.base_model_name_or_path,
        )

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under PEFT's standard LoRA key names (`base_model.model.<module>.lora_A.weight`)."""
        state = {}
        for name in self.target_modules:
            state[f"{_KEY_PREFIX}{name}.lora_A.weight"] = self.lora_A[name].detach().to("cpu").contiguous()
            state[f"{_KEY_PREFIX}{name}.lora_B.weight"] = self.lora_B[name].detach().to("cpu").contiguous()
        return state

    def save_lora(
        self, path: str | os.PathLike, base_model_name_or_path: str | None = None, overwrite: bool = False
    ) -> Path:
        """Write a standard PEFT LoRA folder that `PeftModel.from_pretrained(base, path)` loads without peft-tagi.

        With instruction fusion the folder also holds `tagi_instruction_states.safetensors` (read by
        `TaskAdapter.load`). Its README.md is the model card that `push_to_hub` uploads (rendered from `hub_cards/`:
        metadata `library_name: peft`, `base_model` when it is a Hub id, tags `peft`, `lora`, `tagi`; the
        instruction; the note on instruction fusion), so a folder uploaded by other means shows on the Hub as a PEFT
        adapter. The write is atomic: the folder is built beside `path` and renamed into place, so a failure leaves
        any previous folder untouched. A non-empty existing folder (a README edited by hand included) is replaced
        only with `overwrite=True`.
        """
        path = Path(path)
        base = base_model_name_or_path or self.base_model_name_or_path
        # Rendered before anything is written: a card that cannot be rendered leaves no half-written folder.
        card = generated_lora_card(self, path.name, base)

        def write(tmp: Path) -> None:
            self.lora_config(base).save_pretrained(str(tmp))
            save_file(self.lora_state_dict(), str(tmp / LORA_WEIGHTS_NAME), metadata={"format": "pt"})
            meta = {
                "format": "peft-tagi task adapter",
                "instruction": self.instruction,
                "generator": self.generator,
                "base_model_name_or_path": base,
                "instruction_fusion": self.instruction_states is not None,
                "instruction_encoder": self.instruction_encoder,
                "metadata": self.metadata,
            }
            (tmp / TAGI_ADAPTER_NAME).write_text(json.dumps(meta, indent=2) + "\n")
            if self.instruction_states is not None:
                states = self.instruction_states.detach().to("cpu").contiguous()
                save_file(
                    {"instruction_states": states}, str(tmp / INSTRUCTION_STATES_NAME), metadata={"format": "pt"}
                )
            card.save(tmp / "README.md")

        atomic_write_dir(path, write, overwrite=overwrite)
        return path

    @classmethod
    def from_instruction(
        cls,
        model,
        tokenizer,
        instruction: str,
        generator: str | None = None,
        base_model_name_or_path: str | None = None,
    ) -> TaskAdapter:
        """Generate the adapter of one instruction text with a TAGI model.

        Words of the instruction that the tokenizer reads as its unknown token are named in a warning (for a
        closed vocabulary such as the quickstart's, with where to see it): the adapter would be generated from
        unknown tokens.

        Args:
            model (`peft.PeftModel` or `TagiModel`): the TAGI model (a checkpoint loaded with
                `PeftModel.from_pretrained`).
            tokenizer: the base model's tokenizer; a model with its own instruction encoder reads the instruction with
                that encoder's tokenizer instead (`TagiModel.instruction_tokenizer`), whose unknown words are named.
            instruction (`str`): the task instruction, in natural language.
            generator (`str`, *optional*): the TAGI checkpoint (path or Hub id), recorded in the adapter.
            base_model_name_or_path (`str`, *optional*): the base model, recorded in the adapter; defaults to the
                model's own.
        """
        if not instruction or not instruction.strip():
            raise ValueError("The instruction is empty; describe the task in a sentence, e.g. 'Reverse the words.'.")
        tokenizer = getattr(model, "instruction_tokenizer", None) or tokenizer
        warn_unknown_words(tokenizer, instruction)
        encoding = tokenizer([instruction], return_tensors="pt", truncation=True)
        device = next(model.parameters()).device
        [adapter] = model.generate_adapter(
            encoding["input_ids"].to(device), encoding["attention_mask"].to(device), instructions=[instruction]
        )
        adapter.generator = generator or adapter.generator
        adapter.base_model_name_or_path = base_model_name_or_path or adapter.base_model_name_or_path
        return adapter

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> TaskAdapter:
        """Read a folder written by `save_lora` (or any PEFT LoRA folder with r, lora_alpha and standard keys)."""
        path = Path(path)
        config_file = path / LORA_CONFIG_NAME
        weights_file = path / LORA_WEIGHTS_NAME
        if not config_file.is_file() or not weights_file.is_file():
            raise FileNotFoundError(
                f"{path} is not a LoRA folder: it needs {LORA_CONFIG_NAME} and {LORA_WEIGHTS_NAME} "
                "(written by TaskAdapter.save_lora)."
            )
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{config_file} is not valid JSON ({err}); re-export the adapter.") from err
        if config.get("peft_type") != "LORA":
            raise ValueError(
                f"{config_file} has peft_type={config.get('peft_type')!r}; a TaskAdapter folder holds a LoRA "
                "(peft_type 'LORA'). A TAGI generator checkpoint loads with PeftModel.from_pretrained instead."
            )
        missing = [k for k in ("r", "lora_alpha", "task_type") if config.get(k) is None]
        if missing:
            raise ValueError(f"{config_file} lacks the fields {missing}; re-export the adapter with save_lora.")
        state = load_safetensors(weights_file, device)
        lora_A, lora_B = {}, {}
        for key, value in state.items():
            if not key.startswith(_KEY_PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
                raise ValueError(f"{weights_file} holds an unexpected key {key!r}; it is not a PEFT LoRA file.")
            name, kind = key[len(_KEY_PREFIX) :].rsplit(".", 2)[:2]
            (lora_A if kind == "lora_A" else lora_B)[name] = value
        if set(lora_A) != set(lora_B):
            raise ValueError(f"{weights_file} has lora_A and lora_B for different modules; the file is damaged.")
        meta = {}
        if (path / TAGI_ADAPTER_NAME).is_file():
            meta = json.loads((path / TAGI_ADAPTER_NAME).read_text())
        states = None
        if (path / INSTRUCTION_STATES_NAME).is_file():
            states = load_safetensors(path / INSTRUCTION_STATES_NAME, device)["instruction_states"]
        return cls(
            lora_A=lora_A,
            lora_B=lora_B,
            r=int(config["r"]),
            lora_alpha=config["lora_alpha"],
            task_type=config["task_type"],
            fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
            instruction_states=states,
            instruction=meta.get("instruction"),
            base_model_name_or_path=config.get("base_model_name_or_path"),
            generator=meta.get("generator"),
            metadata=meta.get("metadata") or {},
            instruction_encoder=meta.get("instruction_encoder"),
        )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        api: HfApi | None = None,
        token: str | None = None,
        private: bool | None = None,
        commit_message: str = "Upload TAGI-generated LoRA adapter",
        generator: str | None = None,
        metrics: Mapping[str, Any] | None = None,
        base_model_name_or_path: str | None = None,
        create_repo: bool = True,
    ) -> str:
        """Push as a standard PEFT LoRA repo with a generated-LoRA model card.

        The repo holds what `save_lora` writes (`adapter_config.json`, `adapter_model.safetensors`,
        `tagi_adapter.json`, and with fusion `tagi_instruction_states.safetensors`) plus a README.md card that records
        the instruction and the generator. Plain PEFT loads it with `PeftModel.from_pretrained(base, repo_id)`.

        Args:
            repo_id (`str`): the target repo, `"<user or org>/<name>"`.
            api (`huggingface_hub.HfApi`, *optional*): the client to use; defaults to `HfApi(token=token)`.
            token (`str`, *optional*): Hub token; defaults to the logged-in one.
            private (`bool`, *optional*): visibility of a newly created repo.
            commit_message (`str`): message of the upload commit.
            generator (`str`, *optional*): the TAGI checkpoint (Hub id) that generated the adapter; defaults to
                `self.generator`. Recorded in the card and in `tagi_adapter.json`.
            metrics (`dict[str, float]`, *optional*): evaluation results, shown as a table in the card.
            base_model_name_or_path (`str`, *optional*): the base model's Hub id; defaults to
                `self.base_model_name_or_path`. Written to `adapter_config.json` and the card.
            create_repo (`bool`): create the repo first (`exist_ok=True`); set False to push to an existing repo only.

        Returns:
            `str`: the URL of the upload commit.
        """
        base = base_model_name_or_path or self.base_model_name_or_path
        if not base:
            raise ValueError(
                "The adapter does not record its base model; pass base_model_name_or_path='<org>/<model>' so that "
                "the pushed LoRA can be loaded."
            )
        # tagi_adapter.json is written from the adapter itself; a shallow copy shares the tensors.
        adapter = dataclasses.replace(self, generator=generator or self.generator)
        api = default_api(api, token)

        def render(repo: str):
            return generated_lora_card(adapter, repo, base, metrics=metrics)

        with tempfile.TemporaryDirectory(prefix="peft-tagi-push-") as tmp:
            folder = adapter.save_lora(Path(tmp) / "adapter", base_model_name_or_path=base)
            return upload_with_card(
                api,
                folder,
                repo_id,
                render,
                token=token,
                private=private,
                commit_message=commit_message,
                create_repo=create_repo,
            )

    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_path: str | os.PathLike,
        revision: str | None = None,
        *,
        device: str = "cpu",
        **hub_kwargs: Any,
    ) -> TaskAdapter:
        """Load from a local folder or a Hub repo written by `push_to_hub` / `save_lora`.

        A Hub repo is fetched with `huggingface_hub.snapshot_download` (only the adapter files), so the usual cache,
        `HF_HUB_CACHE`, `HF_HUB_OFFLINE=1` and pinned revisions all apply.

        Args:
            repo_id_or_path (`str` or `os.PathLike`): a folder on disk, or a Hub repo id.
            revision (`str`, *optional*): branch, tag or commit of the Hub repo; ignored for a local folder.
            device (`str`): where to put the tensors.
            **hub_kwargs: passed to `snapshot_download` (e.g. `cache_dir`, `token`, `local_files_only`).
        """
        folder = download_folder(repo_id_or_path, TASK_ADAPTER_FILES, revision=revision, **hub_kwargs)
        return cls.load(folder, device=device)
