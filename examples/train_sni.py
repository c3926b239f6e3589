"""Train TAGI on Super-NaturalInstructions and score unseen test tasks (ROUGE-L, exact match).

    python examples/train_sni.py --sni path/to/natural-instructions --model google/t5-base-lm-adapt

`--sni` is a checkout of allenai/natural-instructions (tasks/ + splits/default/); `--model` a Hub id or local path.
Stages: teachers (meta-train LoRA + one LoRA per task) -> hypernetwork pretraining on SNI text -> distillation.
"""

import argparse

import datasets
from peft import get_peft_model
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from peft_tagi import TagiConfig, TagiTrainer, TagiTrainingArguments
from peft_tagi.data.pretraining import pretraining_dataset
from peft_tagi.data.sni import read_sni_tasks

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--sni", required=True, help="natural-instructions folder (tasks/ and splits/default/)")
parser.add_argument("--model", default="google/t5-base-lm-adapt")
parser.add_argument("--output-dir", default="tagi-sni")
parser.add_argument("--num-pos-examples", type=int, default=0, help="0: Def, 2: Def+2Pos")
parser.add_argument("--max-instances", type=int, default=100)
parser.add_argument("--steps", type=int, nargs=3, default=[5000, 2000, 20000], help="teachers, pretrain, distill")
parser.add_argument("--batch-size", type=int, default=8)
parser.add_argument("--learning-rate", type=float, default=1e-4)
parser.add_argument("--r", type=int, default=32)
parser.add_argument("--max-eval-instances", type=int, default=100)
args = parser.parse_args()

tokenizer = AutoTokenizer.from_pretrained(args.model)
base = AutoModelForSeq2SeqLM.from_pretrained(args.model)
model = get_peft_model(base, TagiConfig(task_type="SEQ_2_SEQ_LM", r=args.r, lora_alpha=2 * args.r))
model.print_trainable_parameters()

read = dict(num_pos_examples=args.num_pos_examples)
train = datasets.Dataset.from_list(
    read_sni_tasks(args.sni, "train", max_instances_per_task=args.max_instances, **read)
)
test = datasets.Dataset.from_list(
    read_sni_tasks(args.sni, "test", max_instances_per_task=args.max_eval_instances, **read)
)
texts = [" ".join(x for x in (e["instruction"], e["input"], e["output"]) if x) for e in train]


def run(stage, steps, data, **kw):
    targs = TagiTrainingArguments(
        output_dir=f"{args.output_dir}/{stage}", stage=stage, max_steps=steps, learning_rate=args.learning_rate,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size, warmup_steps=max(1, steps // 50),
        logging_steps=max(1, steps // 20), save_strategy="no", report_to=[], predict_with_generate=True,
        generation_max_length=64,
    )  # fmt: skip
    trainer = TagiTrainer(
        model=model, args=targs, train_dataset=data, eval_dataset=test, processing_class=tokenizer, **kw
    )
    trainer.train()
    return trainer


run("teachers", args.steps[0], train)
run("pretrain", args.steps[1], pretraining_dataset(datasets.Dataset.from_dict({"text": texts})))
trainer = run("distill", args.steps[2], train, teachers=f"{args.output_dir}/teachers/teachers")
model.save_pretrained(f"{args.output_dir}/tagi")
metrics = trainer.evaluate()
print(f"SNI test tasks: ROUGE-L {metrics['eval_rougeL']:.2f}, exact match {metrics['eval_exact_match']:.2f}")
