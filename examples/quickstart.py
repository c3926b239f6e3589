"""The quickstart's TAGI through the Python API: hypernetwork pretraining -> distillation -> held-out adapters.

    python examples/quickstart.py            # the stages of the quickstart's TAGI, without its report's other rows
    python examples/quickstart.py --fast     # a smoke run
The `peft-tagi quickstart` command does the same with the full five-row report.
"""

import argparse

import datasets

from peft_tagi.data.pretraining import pretraining_dataset
from peft_tagi.data.synthetic import SyntheticSuite
from peft_tagi.embedded_base import TARGET_MODULES, load_embedded_base
from peft_tagi.pipeline import score, serve_by_instruction, tagi_model, train_stage, training_arguments
from peft_tagi.quickstart import QuickstartConfig

parser = argparse.ArgumentParser()
parser.add_argument("--fast", action="store_true")
parser.add_argument("--output-dir", default="quickstart-api")
args = parser.parse_args()
cfg = QuickstartConfig.fast() if args.fast else QuickstartConfig()
out = args.output_dir

suite = SyntheticSuite(seed=0)
train = suite.examples(suite.train_tasks(), cfg.train_instances, seed=0)
# MiniLM reads the instructions: three quarters of them are reworded in other words.
train = datasets.Dataset.from_list(
    suite.free_wording_examples(train, cfg.free_wording_fraction(), seed=0, variety=cfg.free_wording_variety)
)
heldout = suite.examples(suite.heldout_tasks(), cfg.eval_instances, split="eval", seed=1)
texts = suite.pretraining_texts(20000 if cfg.base_steps > 100 else 256)

# 1. The small pretrained BART shipped in the package (TAGI assumes a pretrained base); a frozen MiniLM (extra
# [encoder]) reads the instructions, the base reads the inputs.
base, tokenizer, _ = load_embedded_base()
targets = list(cfg.target_modules or TARGET_MODULES["bart"])  # None: every attention and feed-forward projection
model = tagi_model(
    base, r=cfg.r, lora_alpha=cfg.lora_alpha, target_modules=targets, instruction_encoder=cfg.instruction_encoder
)


def stage(name, steps, data, **losses):
    options = dict(per_device_train_batch_size=cfg.batch_size, learning_rate=cfg.learning_rate, **losses)
    train_stage(model, tokenizer, training_arguments(f"{out}/{name}", name, steps, **options), data)


stage("pretrain", cfg.pretrain_steps, pretraining_dataset(datasets.Dataset.from_dict({"text": texts})))  # 2.
# 3. The quickstart's weights: CE on the references alone (lambda_kl 0, lambda_ins 0, chosen on left-out training
# tasks), so no teacher is read. The paper's weights (TagiTrainingArguments' defaults: + 5 KL to the meta-train
# teacher + sigmoid-weighted ΔW alignment to per-task LoRAs) need stage "teachers" first and its folder as teachers=.
stage("distill", cfg.distill_steps, train, **cfg.distillation_losses())
model.save_pretrained(f"{out}/tagi")

# 4. Held-out tasks: one adapter per instruction, generated once, then plain forwards on the inputs alone.
model.eval()
adapters = {}
predictions = serve_by_instruction(model, tokenizer, heldout, adapters=adapters, max_new_tokens=16)
adapters[heldout[-1]["instruction"]].save_lora(f"{out}/last_task_lora", overwrite=True)  # a standard PEFT LoRA
scores = score(predictions, heldout)
print(f"held-out ROUGE-L {scores['rougeL']:.1f}  exact match {scores['exact_match']:.1f}")
