"""Train TAGI on P3 (T0's training mixture) and score held-out tasks by rank classification.

    python examples/train_p3.py --p3 bigscience/P3 --train-subsets ... --eval-subset super_glue_rte_GPT_3_style

Each `--train-subsets` entry is a P3 subset (a Hub config of bigscience/P3 or a local `save_to_disk` folder);
`--eval-subset` a subset with answer choices. The instruction of a subset is its prompted input; the task input is
the same text (P3 mixes them), see `peft_tagi.data.p3`.
"""

import argparse

import datasets
import torch
from peft import get_peft_model
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from peft_tagi import TagiConfig, TagiTrainer, TagiTrainingArguments
from peft_tagi.data.p3 import p3_dataset_name, p3_examples
from peft_tagi.metrics import choice_log_likelihoods, rank_classification_accuracy

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--p3", default="bigscience/P3", help="Hub id of P3 or a folder holding subset folders")
parser.add_argument("--train-subsets", nargs="+", required=True)
parser.add_argument("--eval-subset", required=True)
parser.add_argument("--model", default="google/t5-base-lm-adapt")
parser.add_argument("--output-dir", default="tagi-p3")
parser.add_argument("--max-instances", type=int, default=100)
parser.add_argument("--steps", type=int, nargs=2, default=[5000, 20000], help="teachers, distill")
parser.add_argument("--batch-size", type=int, default=8)
parser.add_argument("--learning-rate", type=float, default=1e-4)
args = parser.parse_args()


def subset(name):
    source = f"{args.p3}/{name}" if not args.p3.startswith("bigscience/") else name
    # One teacher LoRA per P3 dataset (TAGI's grouping); a subset outside T0's lists is its own group.
    category = p3_dataset_name(name) or name
    return p3_examples(
        source, task_name=name, category=category, max_instances=args.max_instances, input_column="inputs_pretokenized"
    )


tokenizer = AutoTokenizer.from_pretrained(args.model)
model = get_peft_model(AutoModelForSeq2SeqLM.from_pretrained(args.model), TagiConfig(task_type="SEQ_2_SEQ_LM"))
train = datasets.Dataset.from_list([e for name in args.train_subsets for e in subset(name)])
for stage, steps in zip(("teachers", "distill"), args.steps):
    targs = TagiTrainingArguments(
        output_dir=f"{args.output_dir}/{stage}", stage=stage, max_steps=steps, learning_rate=args.learning_rate,
        per_device_train_batch_size=args.batch_size, save_strategy="no", report_to=[], group_by="category",
        logging_steps=max(1, steps // 20),
    )  # fmt: skip
    teachers = f"{args.output_dir}/teachers/teachers" if stage == "distill" else None
    TagiTrainer(model=model, args=targs, train_dataset=train, processing_class=tokenizer, teachers=teachers).train()
model.save_pretrained(f"{args.output_dir}/tagi")

# Rank classification: the answer choice with the highest log-likelihood under the generated adapter wins.
model.eval()
scores, gold = [], []
for example in subset(args.eval_subset):
    if not example["choices"]:
        continue
    n = len(example["choices"])
    ins = tokenizer([example["instruction"]] * n, return_tensors="pt", truncation=True)
    inp = tokenizer([example["input"]] * n, return_tensors="pt", truncation=True)
    lab = tokenizer(example["choices"], return_tensors="pt", padding=True)
    labels = lab["input_ids"].masked_fill(lab["attention_mask"] == 0, -100)
    with torch.no_grad():
        logits = model(**inp, labels=labels, instruction_input_ids=ins["input_ids"]).logits
    scores.append(choice_log_likelihoods(logits, labels).tolist())
    gold.append(example["choices"].index(example["output"]) if example["output"] in example["choices"] else 0)
print(f"{args.eval_subset}: rank-classification accuracy {rank_classification_accuracy(scores, gold):.2f}")
