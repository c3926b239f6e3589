"""Train TAGI on Super-NaturalInstructions and score unseen test tasks (ROUGE-L, exact match).

    python examples/train_sni.py --sni_dir path/to/natural-instructions --model_name_or_path google/t5-base-lm-adapt \
        --output_dir tagi-sni --per_device_train_batch_size 8 --learning_rate 1e-4 --bf16 --save_steps 1000
    accelerate launch examples/train_sni.py ...            # the same flags, on every process
    python examples/train_sni.py args.yaml                 # or all options in one .json / .yaml file
    python examples/train_sni.py ... --resume_from_checkpoint   # continue a stopped run where it stopped

`--sni_dir` is a checkout of allenai/natural-instructions (tasks/ + splits/default/). Stages: teachers (meta-train
LoRA + one LoRA per task) -> hypernetwork pretraining on the SNI training text -> distillation, in
`<output_dir>/{teachers,pretrain,distill}` with their checkpoints; the trained TAGI model is `<output_dir>/distill`.
Every `TagiTrainingArguments` / `Seq2SeqTrainingArguments` flag applies to all stages; `--help` lists them.
"""

from dataclasses import dataclass, field

import datasets

from peft_tagi.arguments import parse_arguments, setup_logging
from peft_tagi.data.pretraining import pretraining_dataset
from peft_tagi.data.sni import sni_dataset
from peft_tagi.pipeline import load_tagi_model, run_stages


@dataclass
class DataTrainingArguments:
    sni_dir: str = field(metadata={"help": "natural-instructions folder (tasks/ and splits/default/)."})
    num_pos_examples: int = field(default=0, metadata={"help": "Positive examples in the instruction: 0 Def, 2 Def+2Pos."})  # fmt: skip
    max_train_instances_per_task: int = field(default=100, metadata={"help": "Training instances per task."})
    max_eval_instances_per_task: int = field(default=100, metadata={"help": "Test instances per task."})


def main() -> None:
    defaults = {
        "output_dir": "tagi-sni",
        "learning_rate": 1e-4,
        "predict_with_generate": True,
        "generation_max_length": 64,
        "do_eval": True,
    }
    model_args, data_args, stage_args, training_args = parse_arguments(DataTrainingArguments, defaults)
    setup_logging(training_args)

    read = {"num_pos_examples": data_args.num_pos_examples}
    with training_args.main_process_first(desc="reading SNI"):
        train = sni_dataset(data_args.sni_dir, "train", max_instances_per_task=data_args.max_train_instances_per_task, **read)  # fmt: skip
        test = sni_dataset(data_args.sni_dir, "test", max_instances_per_task=data_args.max_eval_instances_per_task, **read)  # fmt: skip
    texts = [" ".join(x for x in (e["instruction"], e["input"], e["output"]) if x) for e in train]
    pretrain = None
    if stage_args.pretrain_steps:
        pretrain = pretraining_dataset(datasets.Dataset.from_dict({"text": texts}), seed=training_args.seed)

    model, tokenizer = load_tagi_model(
        model_args.model_name_or_path,
        tokenizer=model_args.tokenizer_name,
        dtype=model_args.dtype,
        **model_args.tagi_options(),
    )
    trainer = run_stages(model, tokenizer, training_args, stage_args, train, pretrain, eval_dataset=test)
    if training_args.do_eval:
        metrics = trainer.evaluate(eval_dataset=test)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        if trainer.is_world_process_zero():
            print(
                f"SNI test tasks: ROUGE-L {metrics['eval_rougeL']:.2f}, exact match {metrics['eval_exact_match']:.2f}"
            )


if __name__ == "__main__":
    main()
