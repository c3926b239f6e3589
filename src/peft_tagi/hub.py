"""Hugging Face Hub integration: model cards, pushing TAGI checkpoints and generated LoRAs, pulling task adapters.

Two kinds of repository are written:

- a *hypernetwork* repo: a TAGI checkpoint (`PeftModel.save_pretrained`, peft_type "TAGI"), loaded with
  `import peft_tagi; PeftModel.from_pretrained(base, repo_id)`;
- a *generated LoRA* repo: one `TaskAdapter` exported as a standard PEFT LoRA folder, loaded by plain PEFT with
  `PeftModel.from_pretrained(base, repo_id)` or by peft-tagi with `TaskAdapter.from_pretrained(repo_id)`.

Both are uploaded with `HfApi.upload_folder` together with a card rendered from the Jinja templates in `hub_cards/`.
`PeftModel.push_to_hub` is avoided on purpose: on a repo without a card it writes `library_name: transformers`.

This module knows folders, cards and repos, not `TaskAdapter` (which calls it from `save_lora`, `push_to_hub` and
`from_pretrained`): the cards read an adapter's fields, the upload and download move whole folders.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import ModelCard, ModelCardData
from peft.utils import CONFIG_NAME

if TYPE_CHECKING:
    from huggingface_hub import HfApi
    from peft import PeftModel

logger = logging.getLogger(__name__)

CARD_TEMPLATES = {"generated_lora": "generated_lora.md", "hypernetwork": "hypernetwork.md"}
PAPER_URL = "https://arxiv.org/abs/2406.12382"

_COMMON_FIELDS = ("repo_id", "base_model", "task_type", "r", "lora_alpha", "target_modules", "instruction_fusion")
_REQUIRED_FIELDS = {
    "generated_lora": (*_COMMON_FIELDS, "instruction", "generator"),
    "hypernetwork": (*_COMMON_FIELDS, "pooling", "hypernetwork_hidden_size", "max_instruction_length"),
}
_OPTIONAL_FIELDS = {
    "generated_lora": ("metrics", "tags", "instruction_encoder"),
    "hypernetwork": ("metrics", "tags", "num_parameters", "instruction_encoder", "pooling_queries"),
}
_LOCAL_BASES_WARNED: set[str] = set()
_AUTO_CLASSES = {"SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "CAUSAL_LM": "AutoModelForCausalLM"}


# ---------------------------------------------------------------------------------------------------- cards


def template_dir() -> Path:
    """The folder holding the card templates.

    The canonical templates live in the repository's `hub_cards/`; the package reaches them through
    `peft_tagi/hub_cards` (a link to that folder, copied as real files into wheels). The repository path is a
    fallback for source checkouts where the link could not be created (e.g. Windows without symlink support).
    """
    here = Path(__file__).resolve().parent
    for candidate in (here / "hub_cards", here.parents[1] / "hub_cards"):
        if (candidate / CARD_TEMPLATES["hypernetwork"]).is_file():
            return candidate
    raise FileNotFoundError(
        f"The model card templates are missing (looked in {here / 'hub_cards'}); reinstall peft-tagi."
    )


def hub_model_id(name_or_path: str | os.PathLike | None) -> str | None:
    """`name_or_path` when it is a valid Hub model id, else None (a local path cannot go in card metadata).

    The Hub rejects a card whose `base_model` is not a repo id, so a local path is kept out of the metadata.
    """
    if not name_or_path:
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    name = str(name_or_path)
    if os.path.isabs(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _code(value: Any) -> str:
    text = str(value)
    # Inline code that itself contains a backtick needs a double-backtick fence with padding.
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _md_cell(value: Any) -> str:
    # A table cell ends at "|" or a newline: escape the one, flatten the other.
    return " ".join(str(value).split()).replace("|", "\\|")


def _md_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return _md_cell(value)


def _blockquote(text: str | None) -> str:
    if not text:
        return "> (not recorded)"
    return "\n".join(f"> {line}".rstrip() for line in str(text).splitlines())


def _hub_link(name: str | None) -> str:
    if not name:
        return "(not recorded)"
    repo = hub_model_id(name)
    return f"[`{name}`](https://huggingface.co/{repo})" if repo else _code(name)


def _py_str(value: str | None) -> str:
    # A JSON string literal is a valid Python string literal for every text, quotes and newlines included.
    return json.dumps(value if value is not None else "<base model>", ensure_ascii=False)


def _environment(directory: Path):
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(directory)),
        undefined=jinja2.StrictUndefined,  # a missing field is a bug in the caller, never an empty card section
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters.update(
        code=_code, md_cell=_md_cell, md_value=_md_value, blockquote=_blockquote, hub_link=_hub_link, pystr=_py_str
    )
    return env


def _tags(kind: str, base_repo: str | None, extra: list[str] | None) -> list[str]:
    tags = ["peft", "lora", "tagi"]
    tags.append("generated-adapter" if kind == "generated_lora" else "hypernetwork")
    if base_repo:
        tags.append(f"base_model:adapter:{base_repo}")
    for tag in extra or []:
        if tag not in tags:
            tags.append(tag)
    return tags


def generated_lora_card(adapter, repo_id: str, base_model: str | None, metrics: dict | None = None) -> ModelCard:
    """The model card of a generated LoRA (a `TaskAdapter`), the same for `save_lora` and `push_to_hub`."""
    return render_card(
        "generated_lora",
        repo_id=repo_id,
        base_model=base_model,
        instruction=adapter.instruction,
        generator=adapter.generator,
        task_type=adapter.task_type,
        r=adapter.r,
        lora_alpha=adapter.lora_alpha,
        target_modules=adapter.target_modules,
        instruction_fusion=adapter.instruction_states is not None,
        instruction_encoder=adapter.instruction_encoder,
        metrics=metrics,
    )


def render_card(kind: str, **fields: Any) -> ModelCard:
    """Render a model card from the `hub_cards/` templates.

    Args:
        kind (`str`): `"generated_lora"` (a LoRA written by TAGI for one instruction) or `"hypernetwork"`
            (a TAGI checkpoint).
        **fields: the template fields. Both kinds need `repo_id`, `base_model`, `task_type`, `r`, `lora_alpha`,
            `target_modules` and `instruction_fusion`; `generated_lora` also needs `instruction` and `generator`
            (either may be None), `hypernetwork` needs `pooling`, `hypernetwork_hidden_size` and
            `max_instruction_length`. Optional: `metrics` (`dict[str, float]`, rendered as a table), `tags`
            (extra Hub tags), `instruction_encoder` (a separate encoder that reads the instructions) and, for
            `hypernetwork`, `num_parameters` and `pooling_queries` (the learned queries of attention pooling).

    Returns:
        `huggingface_hub.ModelCard` whose metadata has `library_name: peft`, `base_model` (when it is a Hub id),
        the tags `peft`, `lora`, `tagi` and `base_model:adapter:<base>`, and for a generated LoRA its `instruction`
        and `generator`.
    """
    if kind not in CARD_TEMPLATES:
        raise ValueError(f"Unknown card kind {kind!r}; use one of {sorted(CARD_TEMPLATES)}.")
    missing = [name for name in _REQUIRED_FIELDS[kind] if name not in fields]
    unknown = sorted(set(fields) - set(_REQUIRED_FIELDS[kind]) - set(_OPTIONAL_FIELDS[kind]))
    if missing or unknown:
        raise ValueError(f"render_card({kind!r}): missing fields {missing}, unknown fields {unknown}.")
    values = {name: fields.get(name) for name in (*_REQUIRED_FIELDS[kind], *_OPTIONAL_FIELDS[kind])}
    targets = values["target_modules"]
    # TagiConfig.target_modules may be one regex string: show it as one entry, not one per character.
    values["target_modules"] = [targets] if isinstance(targets, str) else sorted(targets or [])
    task_type = getattr(values["task_type"], "value", values["task_type"])
    values["task_type"] = task_type
    values["auto_class"] = _AUTO_CLASSES.get(task_type, "AutoModel")
    metrics = values["metrics"]
    if metrics is not None and not isinstance(metrics, Mapping):
        raise ValueError(f"metrics must be a dict of name -> value, got {type(metrics).__name__}.")

    base_repo = hub_model_id(values["base_model"])
    if values["base_model"] and base_repo is None and values["base_model"] not in _LOCAL_BASES_WARNED:
        # Said once per base: exporting many adapters of one local base (the quickstart exports 12) would repeat it.
        _LOCAL_BASES_WARNED.add(values["base_model"])
        logger.warning(
            "The base model %r is not a Hugging Face Hub id; it is left out of the card metadata. Pass "
            "base_model_name_or_path='<org>/<model>' so that the Hub links the adapter to its base model.",
            values["base_model"],
        )
    metadata: dict[str, Any] = {"library_name": "peft", "tags": _tags(kind, base_repo, values["tags"])}
    if base_repo:
        metadata["base_model"] = base_repo
    if kind == "generated_lora":
        if values["instruction"] is not None:
            metadata["instruction"] = str(values["instruction"])
        if values["generator"]:
            metadata["generator"] = str(values["generator"])
    card_data = ModelCardData(**metadata)

    template = _environment(template_dir()).get_template(CARD_TEMPLATES[kind])
    content = template.render(card_data=card_data.to_yaml(), **values)
    card = ModelCard(content)
    if card.data.to_dict().get("library_name") != "peft":  # guard against a template that lost its front matter
        raise RuntimeError(f"The {kind} card template did not produce PEFT card metadata; the template is broken.")
    return card


# ---------------------------------------------------------------------------------------------------- push


def default_api(api: HfApi | None, token: str | None) -> HfApi:
    if api is not None:
        return api
    from huggingface_hub import HfApi

    return HfApi(token=token)


def _result_url(info: Any, repo_id: str) -> str:
    url = getattr(info, "commit_url", None) or getattr(info, "pr_url", None)
    return str(url) if url else str(info or f"https://huggingface.co/{repo_id}")


def upload_with_card(
    api: HfApi,
    folder: Path,
    repo_id: str,
    render: Callable[[str], ModelCard],
    *,
    token: str | None,
    private: bool | None,
    commit_message: str,
    create_repo: bool,
) -> str:
    """Create the repo (optionally), write README.md = `render(repo_id)` into `folder`, upload the folder.

    `render` is called before the Hub is touched (a bad field fails without creating an empty repo) and again with the
    resolved id when the Hub resolves a bare "name" to "<user>/name". Returns the URL of the upload commit.
    """
    card = render(repo_id)
    if create_repo:
        url = api.create_repo(repo_id, token=token, private=private, exist_ok=True, repo_type="model")
        resolved = getattr(url, "repo_id", None) or repo_id
        if resolved != repo_id:  # "name" without a namespace resolves to "<user>/name": show the real id
            repo_id = resolved
            card = render(repo_id)
    card.save(folder / "README.md")
    info = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, token=token, repo_type="model"
    )
    url = _result_url(info, repo_id)
    logger.info("Uploaded %s to %s", folder.name, url)
    return url


def push_tagi_checkpoint(
    peft_model: PeftModel,
    repo_id: str,
    *,
    api: HfApi | None = None,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload TAGI hypernetwork checkpoint",
    metrics: Mapping[str, Any] | None = None,
    base_model_name_or_path: str | None = None,
    create_repo: bool = True,
) -> str:
    """Push a TAGI model (`PeftModel` with a `TagiConfig`) as a checkpoint repo with a hypernetwork model card.

    The repo holds what `peft_model.save_pretrained` writes (`adapter_config.json` with peft_type "TAGI",
    `adapter_model.safetensors`) plus a README.md card. It loads with
    `import peft_tagi; PeftModel.from_pretrained(base, repo_id)`.

    Args:
        peft_model (`peft.PeftModel`): the TAGI model.
        repo_id (`str`): the target repo, `"<user or org>/<name>"`.
        api, token, private, commit_message, create_repo: as in `TaskAdapter.push_to_hub`.
        metrics (`dict[str, float]`, *optional*): evaluation results, shown as a table in the card.
        base_model_name_or_path (`str`, *optional*): the base model's Hub id; defaults to the one in the config.
            When given it is also written to the pushed `adapter_config.json`.

    Returns:
        `str`: the URL of the upload commit.
    """
    adapter_name = getattr(peft_model, "active_adapter", "default")
    config = peft_model.peft_config[adapter_name]
    if getattr(config.peft_type, "value", config.peft_type) != "TAGI":
        raise ValueError(
            f"push_tagi_checkpoint needs a TAGI model; this one has peft_type={config.peft_type!r}. Push a generated "
            "TaskAdapter with TaskAdapter.push_to_hub instead."
        )
    base = base_model_name_or_path or config.base_model_name_or_path
    if not base:
        raise ValueError(
            "The TAGI config does not record its base model; pass base_model_name_or_path='<org>/<model>'."
        )
    hypernetwork = getattr(peft_model.base_model, "tagi_hypernetwork", None)
    num_parameters = sum(p.numel() for p in hypernetwork.parameters()) if hypernetwork is not None else None
    api = default_api(api, token)

    def render(repo: str) -> ModelCard:
        return render_card(
            "hypernetwork",
            repo_id=repo,
            base_model=base,
            task_type=config.task_type,
            r=config.r,
            lora_alpha=config.lora_alpha,
            target_modules=config.target_modules,
            instruction_fusion=bool(config.instruction_fusion),
            pooling=config.pooling,
            pooling_queries=config.pooling_queries,
            hypernetwork_hidden_size=config.hypernetwork_hidden_size,
            max_instruction_length=config.max_instruction_length,
            num_parameters=num_parameters,
            instruction_encoder=config.instruction_encoder,
            metrics=metrics,
        )

    with tempfile.TemporaryDirectory(prefix="peft-tagi-push-") as tmp:
        folder = Path(tmp) / "checkpoint"
        peft_model.save_pretrained(str(folder), selected_adapters=[adapter_name])
        if adapter_name != "default":
            # save_pretrained puts a non-default adapter in a subfolder; the repo root must hold the checkpoint.
            folder = folder / adapter_name
        if base_model_name_or_path:
            config_file = folder / CONFIG_NAME
            saved = json.loads(config_file.read_text())
            saved["base_model_name_or_path"] = base_model_name_or_path
            config_file.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
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


# ---------------------------------------------------------------------------------------------------- pull


def download_folder(
    repo_id_or_path: str | os.PathLike, files: list[str], revision: str | None = None, **hub_kwargs: Any
) -> Path:
    """A local folder as it is, or the snapshot of a Hub repo holding only `files` (in the usual HF cache).

    `huggingface_hub.snapshot_download` fetches the repo, so `HF_HUB_CACHE`, `HF_HUB_OFFLINE=1` and pinned revisions all
    apply.

    Args:
        repo_id_or_path (`str` or `os.PathLike`): a folder on disk, or a Hub repo id.
        files (`list[str]`): the file names to download (not the README or anything else in the repo).
        revision (`str`, *optional*): branch, tag or commit of the Hub repo; ignored for a local folder.
        **hub_kwargs: passed to `snapshot_download` (e.g. `cache_dir`, `token`, `local_files_only`).
    """
    path = Path(repo_id_or_path)
    if path.is_dir():
        if revision is not None:
            logger.warning("revision=%r is ignored: %s is a local folder.", revision, path)
        return path
    repo_id = str(repo_id_or_path)
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise FileNotFoundError(
            f"{repo_id!r} is neither an existing folder nor a Hub repo id ('<user>/<name>')."
        ) from err
    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=files, **hub_kwargs))
