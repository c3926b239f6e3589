"""Hub push and pull: rendered cards, uploads through a recording fake `HfApi`, pulls through the real HF cache."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_batch, randomize_hypernetwork, run_python, tiny_t5
from huggingface_hub import CommitInfo, ModelCard, RepoUrl, metadata_load
from huggingface_hub.errors import LocalEntryNotFoundError
from peft import LoraConfig, get_peft_model

from peft_tagi import TagiConfig, TaskAdapter
from peft_tagi.hub import push_tagi_checkpoint, render_card, template_dir

BASE_ID = "user/tiny-t5"
INSTRUCTION = "Reverse the words of the sentence.\nKeep: punctuation | 'quotes' and \"double quotes\".\n---"
LORA_FILES = {"README.md", "adapter_config.json", "adapter_model.safetensors", "tagi_adapter.json"}
CHECKPOINT_FILES = {"README.md", "adapter_config.json", "adapter_model.safetensors"}


class RecordingHfApi:
    """Stands in for `huggingface_hub.HfApi`: records calls and keeps a copy of every uploaded folder.

    The pushed folder is a temporary directory deleted after the upload, so its file list, README and files are
    captured at call time; `remote[repo_id]` plays the role of the repo's latest snapshot.
    """

    def __init__(self, root: Path, namespace: str | None = None):
        self.root = root
        self.namespace = namespace  # emulate the Hub resolving "name" to "<namespace>/name"
        self.calls: list[tuple[str, dict]] = []
        self.uploads: list[dict] = []
        self.remote: dict[str, Path] = {}

    def create_repo(self, repo_id: str, **kwargs) -> RepoUrl:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        if self.namespace and "/" not in repo_id:
            repo_id = f"{self.namespace}/{repo_id}"
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id: str, folder_path: str, **kwargs) -> CommitInfo:
        self.calls.append(("upload_folder", {"repo_id": repo_id, "folder_path": folder_path, **kwargs}))
        folder = Path(folder_path)
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        self.uploads.append({"repo_id": repo_id, "files": files, "readme": (folder / "README.md").read_text()})
        target = self.root / repo_id.replace("/", "--")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(folder, target)
        self.remote[repo_id] = target
        oid = hashlib.sha1(repo_id.encode()).hexdigest()
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/{oid}",
            commit_message=kwargs.get("commit_message") or "",
            commit_description="",
            oid=oid,
        )

    def call_names(self) -> list[str]:
        return [name for name, _ in self.calls]


def seed_hf_cache(cache: Path, repo_id: str, folder: Path) -> str:
    """Lay out `folder` as huggingface_hub's cache does after a download: blobs, snapshot symlinks, refs/main."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    revision = hashlib.sha1(f"{repo_id}@main".encode()).hexdigest()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo_dir / "snapshots" / revision / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision)
    return revision


def tagi_model(fusion: bool, seed: int = 0):
    model = get_peft_model(
        tiny_t5(seed),
        TagiConfig(
            task_type="SEQ_2_SEQ_LM",
            r=4,
            lora_alpha=8,
            hypernetwork_hidden_size=32,
            module_embedding_dim=8,
            instruction_fusion=fusion,
        ),
    )
    randomize_hypernetwork(model)
    return model.eval()


def generated_adapter(model, instruction: str = INSTRUCTION) -> TaskAdapter:
    batch = make_batch("t5")
    [adapter] = model.generate_adapter(batch["instruction_input_ids"][:1], instructions=[instruction])
    return adapter


def card_metadata(readme: str) -> dict:
    return ModelCard(readme).data.to_dict()


def assert_peft_card(metadata: dict, kind_tag: str) -> None:
    assert metadata["library_name"] == "peft"
    assert metadata["base_model"] == BASE_ID
    assert {"peft", "lora", "tagi", kind_tag, f"base_model:adapter:{BASE_ID}"} <= set(metadata["tags"])


def _logits(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


# ---------------------------------------------------------------- cards


def test_templates_ship_inside_the_package():
    directory = template_dir()
    assert directory == Path(__file__).resolve().parents[1] / "src" / "peft_tagi" / "hub_cards"
    root = Path(__file__).resolve().parents[1] / "hub_cards"
    for name in ("generated_lora.md", "hypernetwork.md"):
        assert (directory / name).read_text() == (root / name).read_text()


def test_generated_lora_card_metadata_and_body(tmp_path):
    card = render_card(
        "generated_lora",
        repo_id="user/reverse-lora",
        base_model=BASE_ID,
        instruction=INSTRUCTION,
        generator="user/tagi-t5",
        task_type="SEQ_2_SEQ_LM",
        r=4,
        lora_alpha=8,
        target_modules=["encoder.block.0.layer.0.SelfAttention.q"],
        instruction_fusion=True,
        metrics={"rougeL": 48.4321, "exact|match": 12},
    )
    metadata = card.data.to_dict()
    assert_peft_card(metadata, "generated-adapter")
    assert metadata["instruction"] == INSTRUCTION  # quotes, newlines, "|" and "---" survive the YAML round trip
    assert metadata["generator"] == "user/tagi-t5"
    card.save(tmp_path / "README.md")
    assert metadata_load(tmp_path / "README.md") == metadata
    text = card.text
    assert "library_name: transformers" not in card.content
    assert 'PeftModel.from_pretrained(base, "user/reverse-lora")' in text
    assert 'AutoModelForSeq2SeqLM.from_pretrained("user/tiny-t5")' in text
    assert "> Reverse the words of the sentence.\n> Keep: punctuation" in text
    assert "| rougeL | 48.43 |" in text and "| exact\\|match | 12 |" in text
    assert "2406.12382" in text and "Task Adapters Generation from Instructions" in text
    assert "drops fusion" in text and 'TaskAdapter.from_pretrained("user/reverse-lora")' in text


def test_hypernetwork_card_metadata_and_body():
    card = render_card(
        "hypernetwork",
        repo_id="user/tagi-t5",
        base_model=BASE_ID,
        task_type="SEQ_2_SEQ_LM",
        r=32,
        lora_alpha=64,
        target_modules=["v", "q"],
        instruction_fusion=True,
        pooling="mean",
        hypernetwork_hidden_size=256,
        max_instruction_length=1024,
        num_parameters=1234567,
    )
    metadata = card.data.to_dict()
    assert_peft_card(metadata, "hypernetwork")
    assert "instruction" not in metadata and "library_name: transformers" not in card.content
    text = card.text
    assert "| LoRA rank / alpha | 32 / 64 |" in text and "| target modules | `q`, `v` |" in text
    assert "| instruction fusion | yes |" in text and "| hypernetwork parameters | 1,234,567 |" in text
    assert "import peft_tagi" in text and 'PeftModel.from_pretrained(base, "user/tagi-t5")' in text
    assert "model.generate_adapter(" in text and "## Evaluation" not in text  # no metrics given: no table
    assert "2406.12382" in text
    assert "| instruction pooling | mean |" in text  # one query (the default) adds nothing to the row
    several = render_card(
        "hypernetwork", repo_id="user/tagi-t5", base_model=BASE_ID, task_type="SEQ_2_SEQ_LM", r=32, lora_alpha=64,
        target_modules=["q"], instruction_fusion=True, pooling="attention", pooling_queries=4,
        hypernetwork_hidden_size=256, max_instruction_length=1024,
    )  # fmt: skip
    assert "| instruction pooling | attention (4 learned queries) |" in several.text


def test_card_errors_and_local_base_model(caplog):
    with pytest.raises(ValueError, match="Unknown card kind"):
        render_card("dataset")
    with pytest.raises(ValueError, match=r"missing fields \['repo_id'"):
        render_card("hypernetwork", base_model=BASE_ID)
    fields = dict(
        repo_id="user/x", base_model="/tmp/local/base", instruction=None, generator=None, task_type="CAUSAL_LM",
        r=2, lora_alpha=4, target_modules="q_proj|v_proj", instruction_fusion=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"unknown fields \['instructions'\]"):
        render_card("generated_lora", **fields, instructions="typo")
    with caplog.at_level("WARNING", logger="peft_tagi.hub"):
        card = render_card("generated_lora", **fields)
    # A local path is not a Hub id: the Hub would reject it as base_model, so it stays out of the metadata.
    metadata = card.data.to_dict()
    assert metadata["library_name"] == "peft" and "base_model" not in metadata
    assert not any(tag.startswith("base_model:") for tag in metadata["tags"])
    assert "not a Hugging Face Hub id" in caplog.text
    assert "| target modules | `q_proj\\|v_proj` |" in card.text  # a regex is one entry, its "|" escaped
    assert "AutoModelForCausalLM" in card.text and "> (not recorded)" in card.text


# ---------------------------------------------------------------- push


@pytest.mark.parametrize("fusion", [True, False])
def test_push_task_adapter_uploads_lora_folder_and_card(tmp_path, fusion):
    adapter = generated_adapter(tagi_model(fusion))
    api = RecordingHfApi(tmp_path / "remote")
    url = adapter.push_to_hub(
        "user/reverse-lora",
        api=api,
        private=True,
        generator="user/tagi-t5",
        metrics={"rougeL": 41.5},
        base_model_name_or_path=BASE_ID,
    )
    assert url.startswith("https://huggingface.co/user/reverse-lora/commit/")
    assert api.call_names() == ["create_repo", "upload_folder"]
    create, upload = api.calls[0][1], api.calls[1][1]
    assert create["repo_id"] == "user/reverse-lora" and create["exist_ok"] is True and create["private"] is True
    assert upload["repo_id"] == "user/reverse-lora" and upload["commit_message"]
    assert not Path(upload["folder_path"]).exists()  # the temporary folder is cleaned up
    [record] = api.uploads
    expected = LORA_FILES | ({"tagi_instruction_states.safetensors"} if fusion else set())
    assert set(record["files"]) == expected
    metadata = card_metadata(record["readme"])
    assert_peft_card(metadata, "generated-adapter")
    assert metadata["instruction"] == INSTRUCTION and metadata["generator"] == "user/tagi-t5"
    assert "library_name: transformers" not in record["readme"] and "| rougeL | 41.5 |" in record["readme"]
    assert ("drops fusion" in record["readme"]) is fusion
    remote = api.remote["user/reverse-lora"]
    config = json.loads((remote / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == BASE_ID
    assert json.loads((remote / "tagi_adapter.json").read_text())["generator"] == "user/tagi-t5"
    assert adapter.generator is None  # the pushed copy records the generator, the caller's adapter is unchanged


@pytest.mark.parametrize("fusion", [True, False])
def test_save_lora_writes_the_card_that_push_to_hub_uploads(tmp_path, fusion):
    adapter = generated_adapter(tagi_model(fusion))
    adapter.generator = "user/tagi-t5"
    folder = adapter.save_lora(tmp_path / "reverse-lora", base_model_name_or_path=BASE_ID)
    saved = (folder / "README.md").read_text()
    metadata = card_metadata(saved)
    assert_peft_card(metadata, "generated-adapter")
    assert metadata["instruction"] == INSTRUCTION and metadata["generator"] == "user/tagi-t5"
    assert "> Reverse the words of the sentence." in saved and ("drops fusion" in saved) is fusion
    assert 'PeftModel.from_pretrained(base, "reverse-lora")' in saved
    # The same card as push_to_hub's, but for the repo id in place of the folder name.
    api = RecordingHfApi(tmp_path / "remote")
    adapter.push_to_hub("user/reverse-lora", api=api, base_model_name_or_path=BASE_ID)
    pushed = api.uploads[0]["readme"]
    assert card_metadata(pushed) == metadata
    assert pushed == saved.replace('"reverse-lora"', '"user/reverse-lora"').replace(
        "# reverse-lora", "# user/reverse-lora"
    )

    # A README edited by hand is kept unless overwrite=True.
    (folder / "README.md").write_text(saved + "\nMy notes on this adapter.\n")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        adapter.save_lora(folder, base_model_name_or_path=BASE_ID)
    assert (folder / "README.md").read_text().endswith("My notes on this adapter.\n")
    adapter.save_lora(folder, base_model_name_or_path=BASE_ID, overwrite=True)
    assert (folder / "README.md").read_text() == saved


def test_save_lora_card_with_a_local_base_model(tmp_path, caplog):
    adapter = generated_adapter(tagi_model(fusion=False))
    folder = adapter.save_lora(tmp_path / "lora", base_model_name_or_path=str(tmp_path / "my-base"))
    metadata = card_metadata((folder / "README.md").read_text())
    # A local path cannot go in the metadata (the Hub rejects it); the card still says it is a PEFT LoRA.
    assert metadata["library_name"] == "peft" and "base_model" not in metadata
    assert {"peft", "lora", "tagi"} <= set(metadata["tags"])
    assert "is not a Hugging Face Hub id" in caplog.text


def test_push_to_hub_method_resolves_namespace_and_can_skip_create(tmp_path):
    adapter = generated_adapter(tagi_model(fusion=False))
    adapter.base_model_name_or_path = BASE_ID
    api = RecordingHfApi(tmp_path / "remote", namespace="alice")
    url = adapter.push_to_hub("reverse-lora", api=api, commit_message="first")
    assert "/alice/reverse-lora/commit/" in url
    assert api.calls[1][1]["repo_id"] == "alice/reverse-lora" and api.calls[1][1]["commit_message"] == "first"
    assert 'PeftModel.from_pretrained(base, "alice/reverse-lora")' in api.uploads[0]["readme"]
    assert "generator" not in card_metadata(api.uploads[0]["readme"])

    api = RecordingHfApi(tmp_path / "remote2")
    adapter.push_to_hub("alice/reverse-lora", api=api, create_repo=False)
    assert api.call_names() == ["upload_folder"]

    adapter.base_model_name_or_path = None
    with pytest.raises(ValueError, match="base_model_name_or_path"):
        adapter.push_to_hub("alice/reverse-lora", api=api)


def test_push_tagi_checkpoint_uploads_checkpoint_and_card(tmp_path):
    model = tagi_model(fusion=True)
    api = RecordingHfApi(tmp_path / "remote")
    push_tagi_checkpoint(model, "user/tagi-t5", api=api, base_model_name_or_path=BASE_ID, metrics={"rougeL": 35.3})
    assert api.call_names() == ["create_repo", "upload_folder"]
    [record] = api.uploads
    assert set(record["files"]) == CHECKPOINT_FILES
    metadata = card_metadata(record["readme"])
    assert_peft_card(metadata, "hypernetwork")
    assert "library_name: transformers" not in record["readme"]
    assert "| LoRA rank / alpha | 4 / 8 |" in record["readme"] and "| instruction fusion | yes |" in record["readme"]
    config = json.loads((api.remote["user/tagi-t5"] / "adapter_config.json").read_text())
    assert config["peft_type"] == "TAGI" and config["base_model_name_or_path"] == BASE_ID

    plain = get_peft_model(tiny_t5(), LoraConfig(task_type="SEQ_2_SEQ_LM", r=2))
    with pytest.raises(ValueError, match="needs a TAGI model"):
        push_tagi_checkpoint(plain, "user/lora", api=api, base_model_name_or_path=BASE_ID)


# ---------------------------------------------------------------- pull


def test_pull_from_local_folder_and_hf_cache_in_process(tmp_path):
    model = tagi_model(fusion=True)
    adapter = generated_adapter(model)
    api = RecordingHfApi(tmp_path / "remote")
    adapter.push_to_hub("user/reverse-lora", api=api, generator="user/tagi-t5", base_model_name_or_path=BASE_ID)
    cache = tmp_path / "cache"
    revision = seed_hf_cache(cache, "user/reverse-lora", api.remote["user/reverse-lora"])

    local = TaskAdapter.from_pretrained(api.remote["user/reverse-lora"])
    pulled = TaskAdapter.from_pretrained("user/reverse-lora", cache_dir=cache, local_files_only=True)
    pinned = TaskAdapter.from_pretrained(
        "user/reverse-lora", revision=revision, cache_dir=cache, local_files_only=True
    )
    for restored in (local, pulled, pinned):
        assert restored.instruction == INSTRUCTION and restored.generator == "user/tagi-t5"
        assert restored.base_model_name_or_path == BASE_ID
        assert torch.equal(restored.instruction_states, adapter.instruction_states)
        for name in adapter.target_modules:
            assert torch.equal(restored.lora_A[name], adapter.lora_A[name])
            assert torch.equal(restored.lora_B[name], adapter.lora_B[name])

    with pytest.raises(LocalEntryNotFoundError):
        TaskAdapter.from_pretrained("user/not-cached", cache_dir=cache, local_files_only=True)
    with pytest.raises(FileNotFoundError, match="neither an existing folder nor a Hub repo id"):
        TaskAdapter.from_pretrained(tmp_path / "missing" / "folder")


def test_pull_through_hf_cache_in_fresh_process(tmp_path, monkeypatch):
    """HF_HUB_CACHE + HF_HUB_OFFLINE=1 in a fresh process: plain PEFT, peft-tagi and TaskAdapter load by repo id."""
    tiny_t5().save_pretrained(tmp_path / "base")
    api = RecordingHfApi(tmp_path / "remote")
    batch = make_batch("t5")
    plain = {k: v for k, v in batch.items() if not k.startswith("instruction")}

    fused = tagi_model(fusion=True)
    push_tagi_checkpoint(fused, "user/tagi-t5", api=api, base_model_name_or_path=BASE_ID)
    fused_adapter = generated_adapter(fused)
    fused_adapter.push_to_hub("user/fused-lora", api=api, generator="user/tagi-t5", base_model_name_or_path=BASE_ID)
    expected = {"tagi": _logits(fused, batch)}
    with fused.use_adapter(fused_adapter):
        expected["fused"] = _logits(fused, plain)

    unfused = tagi_model(fusion=False)
    plain_adapter = generated_adapter(unfused)
    plain_adapter.push_to_hub("user/plain-lora", api=api, base_model_name_or_path=BASE_ID)
    with unfused.use_adapter(plain_adapter):
        expected["plain"] = _logits(unfused, plain)

    cache = tmp_path / "hf-cache"
    for repo_id, folder in api.remote.items():
        seed_hf_cache(cache, repo_id, folder)
    torch.save(batch, tmp_path / "batch.pt")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_python(
        "import sys, torch\n"
        "from peft import PeftModel\n"
        "from transformers import T5ForConditionalGeneration\n"
        f"root = {str(tmp_path)!r}\n"
        "batch = torch.load(root + '/batch.pt', weights_only=True)\n"
        "plain = {k: v for k, v in batch.items() if not k.startswith('instruction')}\n"
        "out = {}\n"
        "lora = PeftModel.from_pretrained(T5ForConditionalGeneration.from_pretrained(root + '/base'), 'user/plain-lora')\n"
        "with torch.no_grad():\n"
        "    out['plain'] = lora.eval()(**plain).logits\n"
        "assert 'peft_tagi' not in sys.modules  # a generated LoRA needs plain PEFT only\n"
        "import peft_tagi\n"
        "tagi = PeftModel.from_pretrained(T5ForConditionalGeneration.from_pretrained(root + '/base'), 'user/tagi-t5')\n"
        "tagi.eval()\n"
        "assert type(tagi.peft_config['default']).__name__ == 'TagiConfig'\n"
        "adapter = peft_tagi.TaskAdapter.from_pretrained('user/fused-lora')\n"
        "assert adapter.generator == 'user/tagi-t5' and adapter.instruction_states is not None\n"
        "with torch.no_grad():\n"
        "    out['tagi'] = tagi(**batch).logits\n"
        "    with tagi.use_adapter(adapter):\n"
        "        out['fused'] = tagi(**plain).logits\n"
        "torch.save(out, root + '/out.pt')\n"
    )
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.equal(out["tagi"], expected["tagi"])
    assert torch.equal(out["fused"], expected["fused"])
    assert (out["plain"] - expected["plain"]).abs().max() <= 1e-5
