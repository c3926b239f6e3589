"""Train TAGI on P3 (T0's training mixture) and score a held-out subset by rank classification.

    python examples/train_p3.py --p3 bigscience/P3 --train_subsets ... --eval_subset super_glue_rte_GPT_3_style \
        --model_name_or_path google/t5-base-lm-adapt --output_dir tagi-p3 --bf16 --save_steps 1000
    accelerate launch examples/train_p3.py ...             # the same flags, on every process
    python examples/train_p3.py args.yaml                  # or all options in one .json / .yaml file
    python examples/train_p3.py ... --resume_from_checkpoint   # continue a stopped run where it stopped

Each `--train_subsets` entry is a P3 subset (a Hub config of bigscience/P3 or a `save_to_disk` folder under `--p3`);
`--eval_subset` a subset with answer choices. The instruction of a subset is its prompted input; the task input is
the same text (P3 mixes them), see `peft_tagi.data.p3`. One teacher LoRA per T0 dataset (`--group_by category`, the
default here). Stages and folders are those of `examples/train_sni.py`; the trained TAGI model is
`<output_dir>/distill`.
"""

from dataclasses import dataclass, field

import datasets
import torch

from peft_tagi.arguments import parse_arguments, setup_logging
from peft_tagi.data.p3 import p3_dataset_name, p3_examples, p3_gold_index
from peft_tagi.data.pretraining import pretraining_dataset
from peft_tagi.metrics import choice_log_likelihoods, rank_classification_accuracy
from peft_tagi.pipeline import load_tagi_model, run_stages


@dataclass
class DataTrainingArguments:
    train_subsets: list[str] = field(metadata={"help": "P3 subsets to train on."})
    eval_subset: str = field(metadata={"help": "P3 subset with answer choices to score."})
    p3: str = field(default="bigscience/P3", metadata={"help": "Hub id of P3 or a folder holding subset folders."})
    max_train_instances: int = field(default=100, metadata={"help": "Training instances per subset."})
    max_eval_instances: int = field(default=100, metadata={"help": "Instances of the evaluated subset."})


def read_subset(data_args: DataTrainingArguments, name: str, max_instances: int) -> list[dict]:
    source = name if data_args.p3.startswith("bigscience/") else f"{data_args.p3}/{name}"
    # A subset outside T0's lists is its own group.
    category = p3_dataset_name(name) or name
    return p3_examples(
        source, task_name=name, category=category, max_instances=max_instances, input_column="inputs_pretokenized"
    )


def rank_classification(model, tokenizer, examples: list[dict]) -> float:
    """Accuracy of picking the answer choice with the highest log-likelihood under the generated adapter."""
    model.eval()
    device = next(model.parameters()).device
    # A model with its own instruction encoder reads instructions with that encoder's tokenizer.
    instruction_tokenizer = model.base_model.instruction_tokenizer or tokenizer
    scores, gold = [], []
    for example in examples:
        if not example["choices"]:
            continue
        n = len(example["choices"])
        ins = instruction_tokenizer([example["instruction"]] * n, return_tensors="pt", truncation=True).to(device)
        inp = tokenizer([example["input"]] * n, return_tensors="pt", truncation=True).to(device)
        lab = tokenizer(example["choices"], return_tensors="pt", padding=True).to(device)
        labels = lab["input_ids"].masked_fill(lab["attention_mask"] == 0, -100)
        with torch.no_grad():
            logits = model(**inp, labels=labels, instruction_input_ids=ins["input_ids"]).logits
        scores.append(choice_log_likelihoods(logits, labels).tolist())
        gold.append(p3_gold_index(example))
    if not scores:
        raise ValueError("The evaluated P3 subset has no example with answer choices; pick a subset that has them.")
    return rank_classification_accuracy(scores, gold)


def main() -> None:
    defaults = {"output_dir": "tagi-p3", "learning_rate": 1e-4, "group_by": "category", "do_eval": True}
    model_args, data_args, stage_args, training_args = parse_arguments(DataTrainingArguments, defaults)
    setup_logging(training_args)

    with training_args.main_process_first(desc="reading P3"):
        rows = [e for name in data_args.train_subsets for e in read_subset(data_args, name, data_args.max_train_instances)]  # fmt: skip
        evaluated = read_subset(data_args, data_args.eval_subset, data_args.max_eval_instances)
    train = datasets.Dataset.from_list(rows)
    texts = [" ".join(x for x in (e["instruction"], e["output"]) if x) for e in rows]
    pretrain = None
    if stage_args.pretrain_steps:
        pretrain = pretraining_dataset(datasets.Dataset.from_dict({"text": texts}), seed=training_args.seed)

    model, tokenizer = load_tagi_model(
        model_args.model_name_or_path,
        tokenizer=model_args.tokenizer_name,
        dtype=model_args.dtype,
        **model_args.tagi_options(),
    )
    trainer = run_stages(model, tokenizer, training_args, stage_args, train, pretrain)
    if training_args.do_eval and trainer.is_world_process_zero():
        accuracy = rank_classification(trainer.model, tokenizer, evaluated)
        trainer.log_metrics("eval", {"eval_accuracy": accuracy})
        trainer.save_metrics("eval", {"eval_accuracy": accuracy})
        print(f"{data_args.eval_subset}: rank-classification accuracy {accuracy:.2f}")


if __name__ == "__main__":
    main()
