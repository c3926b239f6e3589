"""The quickstart through the Python API: teachers -> hypernetwork pretraining -> distillation -> held-out adapters.

    python examples/quickstart.py            # about 12 minutes on 2 CPU cores
    python examples/quickstart.py --fast     # a smoke run
The `peft-tagi quickstart` command does the same with the full five-row report.
"""

import argparse

import datasets
import torch
from peft import get_peft_model

from peft_tagi import TagiConfig, TagiTrainer, TagiTrainingArguments
from peft_tagi.data.pretraining import pretraining_dataset
from peft_tagi.data.synthetic import SyntheticSuite, suite_tokenizer
from peft_tagi.metrics import compute_sni_metrics
from peft_tagi.quickstart import QuickstartConfig, build_base_model, pretrain_base

parser = argparse.ArgumentParser()
parser.add_argument("--fast", action="store_true")
parser.add_argument("--output-dir", default="quickstart-api")
cfg = QuickstartConfig.fast() if parser.parse_args().fast else QuickstartConfig()
out = parser.parse_args().output_dir

suite = SyntheticSuite(seed=0)
tokenizer = suite_tokenizer(suite)
train = datasets.Dataset.from_list(suite.examples(suite.train_tasks(), cfg.train_instances, seed=0))
heldout = suite.examples(suite.heldout_tasks(), cfg.eval_instances, split="eval", seed=1)
texts = suite.pretraining_texts(20000 if cfg.base_steps > 100 else 256)

# 1. A small T5 from random weights, pretrained on the suite's plain text (TAGI assumes a pretrained base).
base = build_base_model(len(tokenizer), cfg)
pretrain_base(base, tokenizer, texts, cfg)
model = get_peft_model(
    base,
    TagiConfig(task_type="SEQ_2_SEQ_LM", r=cfg.r, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.target_modules)),
)


def stage(name, steps, data, teachers=None):
    args = TagiTrainingArguments(
        output_dir=f"{out}/{name}", stage=name, max_steps=steps, per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate, report_to=[], save_strategy="no", logging_steps=max(1, steps // 5),
    )  # fmt: skip
    TagiTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, teachers=teachers).train()


stage("teachers", cfg.teacher_steps, train)  # 2. meta-train LoRA + one LoRA per task
stage("pretrain", cfg.pretrain_steps, pretraining_dataset(datasets.Dataset.from_dict({"text": texts})))  # 3.
stage("distill", cfg.distill_steps, train, teachers=f"{out}/teachers/teachers")  # 4. CE + KL + ΔW alignment
model.save_pretrained(f"{out}/tagi")

# 5. Held-out tasks: one adapter per instruction, generated once, then plain forwards.
model.eval()
predictions, adapters = [], {}
for example in heldout:
    if example["instruction"] not in adapters:
        ins = tokenizer([example["instruction"]], return_tensors="pt")
        adapters[example["instruction"]] = model.generate_adapter(ins["input_ids"], ins["attention_mask"])[0]
    adapter = adapters[example["instruction"]]
    with model.use_adapter(adapter), torch.no_grad():
        ids = model.generate(**tokenizer([example["input"]], return_tensors="pt"), max_new_tokens=16)
    predictions.append(tokenizer.decode(ids[0], skip_special_tokens=True).strip())
adapter.save_lora(f"{out}/last_task_lora", overwrite=True)  # a standard PEFT LoRA folder
scores = compute_sni_metrics(predictions, [e["references"] for e in heldout], [e["task_name"] for e in heldout])
print(f"held-out ROUGE-L {scores['rougeL']:.1f}  exact match {scores['exact_match']:.1f}")
