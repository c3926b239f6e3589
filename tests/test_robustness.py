"""Bad input gets a clear error; generated adapters are deterministic; the package never unpickles."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import peft.peft_model
import pytest
import torch
from conftest import make_batch, randomize_hypernetwork, run_python, tiny_gpt2, tiny_t5
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import T5ForConditionalGeneration

from peft_tagi import TagiConfig, TaskAdapter

SRC = Path(__file__).resolve().parents[1] / "src" / "peft_tagi"


def tagi(fusion: bool = False, **config):
    model = get_peft_model(
        tiny_t5(),
        TagiConfig(task_type="SEQ_2_SEQ_LM", r=4, instruction_fusion=fusion, hypernetwork_hidden_size=32, **config),
    )
    randomize_hypernetwork(model)
    return model


def tiny_t5_wider() -> T5ForConditionalGeneration:
    config = tiny_t5().config
    config.d_model = 48
    return T5ForConditionalGeneration(config).eval()


def exported(tmp_path, **config) -> Path:
    model = tagi(**config)
    [adapter] = model.generate_adapter(make_batch("t5")["instruction_input_ids"][:1])
    return adapter.save_lora(tmp_path / "lora")


def _empty_instruction():
    batch = make_batch("t5")
    batch["instruction_attention_mask"][1] = 0
    tagi()(**batch)


def _no_instruction():
    batch = make_batch("t5")
    tagi()(input_ids=batch["input_ids"], labels=batch["labels"])


def _too_long_refused():
    batch = make_batch("t5")
    tagi(max_instruction_length=3, instruction_overflow="error")(**batch)


def _batch_mismatch():
    batch = make_batch("t5")
    batch["instruction_input_ids"] = batch["instruction_input_ids"][:2]
    batch["instruction_attention_mask"] = batch["instruction_attention_mask"][:2]
    tagi()(**batch)


def _adapter_of_other_shapes():
    model = tagi()
    other = get_peft_model(tiny_gpt2(), TagiConfig(task_type="CAUSAL_LM", r=4))
    [adapter] = other.generate_adapter(torch.tensor([[5, 6, 7]]))
    with model.use_adapter(adapter):
        pass


def _adapter_of_other_rank():
    model = tagi()
    small = get_peft_model(tiny_t5(), TagiConfig(task_type="SEQ_2_SEQ_LM", r=2, instruction_fusion=False))
    [adapter] = small.generate_adapter(torch.tensor([[5, 6, 7]]))
    with model.use_adapter(adapter):
        pass


def _nan_weights():
    model = tagi()
    with torch.no_grad():
        next(iter(model.base_model.hypernetwork.heads_B.values())).bias.fill_(float("nan"))
    model(**make_batch("t5"))


def _missing_target_modules():
    get_peft_model(tiny_t5(), TagiConfig(task_type="SEQ_2_SEQ_LM", target_modules=["q_proj"]))


def _decoder_only_as_seq2seq():
    get_peft_model(tiny_gpt2(), TagiConfig(task_type="SEQ_2_SEQ_LM"))


def _fusion_adapter_missing_states(tmp_path):
    folder = exported(tmp_path)
    with tagi(fusion=True).use_adapter(TaskAdapter.load(folder)):
        pass


def _truncated_safetensors(tmp_path):
    folder = exported(tmp_path)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    TaskAdapter.load(folder)


def _unknown_peft_type(tmp_path):
    folder = exported(tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["peft_type"] = "MYSTERY"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    TaskAdapter.load(folder)


def _missing_config_fields(tmp_path):
    folder = exported(tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    del config["r"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    TaskAdapter.load(folder)


def _exported_lora_on_a_wider_base_with_plain_peft(tmp_path):
    # peft's own message (plain peft loading runs no peft-tagi code): it names each module and both shapes. The
    # fix, loading onto the base the adapter was generated for, is in the exported README and adapter_config.
    PeftModel.from_pretrained(tiny_t5_wider(), exported(tmp_path))


def _exported_lora_on_a_wider_base_with_peft_tagi(tmp_path):
    wider = get_peft_model(tiny_t5_wider(), TagiConfig(task_type="SEQ_2_SEQ_LM", r=4, instruction_fusion=False))
    with wider.use_adapter(TaskAdapter.load(exported(tmp_path))):
        pass


def _corrupt_checkpoint(tmp_path):
    tagi().save_pretrained(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])
    PeftModel.from_pretrained(tiny_t5(), tmp_path / "ckpt")


def _checkpoint_config_missing_fields(tmp_path):
    tagi().save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "adapter_config.json").read_text())
    del config["r"], config["hypernetwork_hidden_size"]
    (tmp_path / "ckpt" / "adapter_config.json").write_text(json.dumps(config))
    PeftModel.from_pretrained(tiny_t5(), tmp_path / "ckpt")


def _checkpoint_folder_exists(tmp_path):
    tagi().save_pretrained(tmp_path / "ckpt")
    tagi().save_pretrained(tmp_path / "ckpt")


def _pickled_checkpoint(tmp_path):
    tagi().save_pretrained(tmp_path / "ckpt", safe_serialization=False)


def _existing_folder(tmp_path):
    folder = exported(tmp_path)
    [adapter] = tagi().generate_adapter(torch.tensor([[5, 6]]))
    adapter.save_lora(folder)


BAD_INPUTS = [
    # (case, error type, what the message must say: the problem and the fix)
    (_empty_instruction, ValueError, r"rows \[1\] are empty.*needs a non-empty task instruction"),
    (_no_instruction, ValueError, r"No instruction_input_ids and no active TaskAdapter.*use_adapter"),
    (_too_long_refused, ValueError, r"more than max_instruction_length=3.*raise TagiConfig.max_instruction_length"),
    (_batch_mismatch, ValueError, r"3 inputs but 2 instructions.*one instruction row per input row"),
    (_adapter_of_other_shapes, ValueError, r"targets other modules than this model.*another base model"),
    (_adapter_of_other_rank, ValueError, r"have shapes A\(2, 32\).*expects A\(4, 32\).*another rank"),
    (_nan_weights, ValueError, r"contain NaN or inf.*reload a good checkpoint"),
    (_missing_target_modules, ValueError, r"Target modules .*q_proj.* not found"),
    (_decoder_only_as_seq2seq, ValueError, r"needs an encoder-decoder model.*task_type='CAUSAL_LM'"),
    (_fusion_adapter_missing_states, ValueError, r"no instruction states.*TaskAdapter.load"),
    (_truncated_safetensors, ValueError, r"not a readable safetensors file.*truncated or corrupt"),
    (_unknown_peft_type, ValueError, r"peft_type='MYSTERY'.*holds a LoRA"),
    (_missing_config_fields, ValueError, r"lacks the fields \['r'\].*re-export"),
    (_existing_folder, FileExistsError, r"is not empty; pass overwrite=True"),
    (
        _exported_lora_on_a_wider_base_with_plain_peft,
        RuntimeError,
        r"size mismatch for .*SelfAttention\.q\.lora_A.*\[4, 32\]\) from checkpoint.*current model is torch\.Size\(\[4, 48\]\)",
    ),
    (_exported_lora_on_a_wider_base_with_peft_tagi, ValueError, r"A\(4, 32\).*expects A\(4, 48\).*other shapes"),
    (_corrupt_checkpoint, ValueError, r"ckpt/adapter_model\.safetensors is not a readable.*save or download it again"),
    (_checkpoint_config_missing_fields, ValueError, r"lacks the fields \['r', 'hypernetwork_hidden_size'\].*save the"),
    (_checkpoint_folder_exists, FileExistsError, r"not empty; pass overwrite=True to save_pretrained"),
    (_pickled_checkpoint, ValueError, r"safetensors only"),
]


@pytest.mark.parametrize(("case", "error", "message"), BAD_INPUTS, ids=[c[0].__name__.strip("_") for c in BAD_INPUTS])
def test_bad_input_is_explained(case, error, message, tmp_path):
    kwargs = {"tmp_path": tmp_path} if "tmp_path" in case.__code__.co_varnames else {}
    with pytest.raises(error) as info:
        case(**kwargs)
    assert re.search(message, str(info.value), flags=re.S), str(info.value)


def test_too_long_instruction_is_truncated_with_a_warning(caplog):
    model = tagi(max_instruction_length=3)
    batch = make_batch("t5")
    with caplog.at_level("WARNING"):
        out = model(**batch)
    assert "keeping the first 3 tokens" in caplog.text
    cut = {k: v for k, v in batch.items()}
    cut["instruction_input_ids"] = batch["instruction_input_ids"][:, :3]
    cut["instruction_attention_mask"] = batch["instruction_attention_mask"][:, :3]
    assert torch.allclose(out.logits, model(**cut).logits, atol=1e-6)


def test_a_failed_save_leaves_the_old_folder_intact(tmp_path, monkeypatch):
    folder = exported(tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    [adapter] = tagi().generate_adapter(torch.tensor([[9, 8, 7]]))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("peft_tagi.adapter.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        adapter.save_lora(folder, overwrite=True)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["lora"], "a temporary folder was left behind"


def _hypernetwork_bytes(model) -> bytes:
    return b"".join(p.detach().numpy().tobytes() for p in model.base_model.tagi_hypernetwork.parameters())


def test_save_pretrained_overwrite_replaces_the_adapter_and_keeps_the_rest(tmp_path):
    first, second = tagi(), tagi()
    randomize_hypernetwork(second, seed=7)
    first.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "notes.txt").write_text("mine")
    readme = tmp_path / "ckpt" / "README.md"
    readme.write_text(readme.read_text() + "\nMy own notes.\n")
    second.save_pretrained(tmp_path / "ckpt", overwrite=True)
    assert (tmp_path / "ckpt" / "notes.txt").read_text() == "mine"
    assert "My own notes." in readme.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"], "a temporary folder was left behind"
    loaded = PeftModel.from_pretrained(tiny_t5(), tmp_path / "ckpt")
    assert _hypernetwork_bytes(loaded) == _hypernetwork_bytes(second) != _hypernetwork_bytes(first)


@pytest.mark.parametrize("existing", [False, True], ids=["new-folder", "overwrite"])
def test_a_failed_save_pretrained_leaves_nothing_half_written(tmp_path, monkeypatch, existing):
    folder = tmp_path / "ckpt"
    if existing:
        tagi().save_pretrained(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()} if existing else None

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("peft.peft_model.safe_save_file", crash)
    model = tagi()
    randomize_hypernetwork(model, seed=3)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(folder, overwrite=existing)
    assert ({p.name: p.read_bytes() for p in folder.iterdir()} if existing else folder.exists()) == (
        before if existing else False
    )
    assert [p.name for p in tmp_path.iterdir()] == (["ckpt"] if existing else []), "temporary folder left behind"


def test_a_save_pretrained_killed_midway_leaves_the_old_checkpoint(tmp_path):
    tagi().save_pretrained(tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    tests_dir = str(Path(__file__).parent)
    code = (
        "import os, signal, sys\n"
        f"sys.path.insert(0, {tests_dir!r})\n"
        "import peft.peft_model\n"
        "from test_robustness import randomize_hypernetwork, tagi\n"
        "write = peft.peft_model.safe_save_file\n"
        "def write_then_die(*args, **kwargs):\n"
        "    write(*args, **kwargs)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "peft.peft_model.safe_save_file = write_then_die\n"
        "model = tagi()\n"
        "randomize_hypernetwork(model, seed=5)\n"
        f"model.save_pretrained({str(tmp_path / 'ckpt')!r}, overwrite=True)\n"
    )
    proc = run_python(code, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before
    # the new weights were written, into a temporary folder beside the checkpoint that the killed process could
    # not remove
    [leftover] = [p for p in tmp_path.iterdir() if p.name != "ckpt"]
    assert leftover.name.startswith(".ckpt.tmp-") and (leftover / "adapter_model.safetensors").is_file()


def test_files_another_process_writes_meanwhile_are_kept(tmp_path, monkeypatch):
    # The Trainer creates checkpoint-N, then rank 0 saves the adapter while other ranks write their RNG states there.
    from peft_tagi.serialization import overwrite_allowed

    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    write = peft.peft_model.safe_save_file

    def write_while_rank_1_writes(*args, **kwargs):
        (folder / "rng_state_1.pth").write_bytes(b"rank 1")
        write(*args, **kwargs)

    monkeypatch.setattr("peft.peft_model.safe_save_file", write_while_rank_1_writes)
    with overwrite_allowed():
        tagi().save_pretrained(folder)
    assert (folder / "rng_state_1.pth").read_bytes() == b"rank 1"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in folder.iterdir()}


def test_other_peft_methods_keep_peft_saving(tmp_path):
    lora = get_peft_model(tiny_t5(), LoraConfig(task_type="SEQ_2_SEQ_LM", target_modules=["q"]))
    lora.save_pretrained(tmp_path / "lora")
    lora.save_pretrained(tmp_path / "lora")  # peft's behaviour: it writes into the folder again
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------- determinism


def _weights_bytes(adapter: TaskAdapter) -> bytes:
    return b"".join(
        adapter.lora_A[n].numpy().tobytes() + adapter.lora_B[n].numpy().tobytes() for n in adapter.target_modules
    )


def test_same_instruction_gives_bitwise_identical_adapters_across_calls_positions_and_processes(tmp_path):
    model = tagi(fusion=True)
    model.save_pretrained(tmp_path / "ckpt")
    tiny_t5().save_pretrained(tmp_path / "base")
    instruction = torch.tensor([[11, 12, 13, 14]])
    [alone] = model.generate_adapter(instruction)
    [again] = model.generate_adapter(instruction)
    batch = torch.tensor([[20, 21, 22, 23, 24, 25], [11, 12, 13, 14, 0, 0], [30, 31, 0, 0, 0, 0]])
    mask = (batch != 0).long()
    in_batch = model.generate_adapter(batch, mask)[1]
    assert _weights_bytes(alone) == _weights_bytes(again) == _weights_bytes(in_batch)
    assert torch.equal(alone.instruction_states, in_batch.instruction_states)
    alone.save_lora(tmp_path / "here")
    run_python(
        "import torch, peft_tagi\n"
        "from peft import PeftModel\n"
        "from transformers import T5ForConditionalGeneration\n"
        f"root = {str(tmp_path)!r}\n"
        "model = PeftModel.from_pretrained(T5ForConditionalGeneration.from_pretrained(root + '/base'), root + '/ckpt')\n"
        "[a] = model.generate_adapter(torch.tensor([[11, 12, 13, 14]]))\n"
        "a.save_lora(root + '/there')\n"
    )
    assert (tmp_path / "here" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "there" / "adapter_model.safetensors"
    ).read_bytes()


# ---------------------------------------------------------------- security


def test_package_writes_safetensors_only_and_never_unpickles():
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text()
        for line_no, line in enumerate(text.splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\btorch\.load\(", code) and "weights_only=True" not in code:
                problems.append(f"{path.name}:{line_no}: torch.load without weights_only=True")
            if re.search(r"\b(import pickle|from pickle|pickle\.load|cloudpickle|dill|joblib\.load)", code):
                problems.append(f"{path.name}:{line_no}: unpickling")
            if "trust_remote_code=True" in code:
                problems.append(f"{path.name}:{line_no}: trust_remote_code")
            if re.search(r"\btorch\.save\(|\.bin[\"']", code):
                problems.append(f"{path.name}:{line_no}: a non-safetensors weight file")
    assert not problems, "\n".join(problems)
