"""The `peft-tagi` command: train the three stages, generate and export adapters, evaluate, run the quickstart."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import warnings
from pathlib import Path

logger = logging.getLogger("peft_tagi.cli")

SUBCOMMANDS = ("train", "generate-adapter", "predict", "export", "evaluate", "quickstart", "demo")


# ---------------------------------------------------------------------------------------------------- loading
def load_config_file(path: str) -> dict:
    """Options from a YAML or JSON file; keys are flag names with '-' or '_' (e.g. max_steps or max-steps)."""
    if not Path(path).is_file():
        raise SystemExit(f"error: config file {path} not found.")
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise SystemExit(f"error: {path} must hold a mapping of option names to values.")
    return {key.replace("-", "_"): value for key, value in data.items()}


def load_examples(spec: str, split: str, max_instances: int, seed: int, num_pos_examples: int = 0) -> list[dict]:
    """Examples of the one format from `synthetic`, `sni:PATH` or `p3:PATH_OR_ID`."""
    if spec == "synthetic":
        from .data.synthetic import SyntheticSuite

        suite = SyntheticSuite(seed=seed)
        tasks = suite.train_tasks() if split == "train" else suite.heldout_tasks()
        return suite.examples(tasks, max_instances, split="train" if split == "train" else "eval", seed=seed)
    kind, _, location = spec.partition(":")
    if kind == "sni" and location:
        from .data.sni import read_sni_tasks

        return read_sni_tasks(
            location, split=split, max_instances_per_task=max_instances, num_pos_examples=num_pos_examples
        )
    if kind == "p3" and location:
        from .data.p3 import p3_examples

        return p3_examples(location, max_instances=max_instances, input_column="inputs_pretokenized", split=split)
    raise SystemExit(f"error: --data must be 'synthetic', 'sni:PATH' or 'p3:PATH_OR_ID', got {spec!r}.")


def load_tagi(model_id: str, tagi_dir: str | None, args=None, trainable: bool = False):
    """A TAGI model and its tokenizer: from a checkpoint folder when given, else a fresh one from the CLI's flags."""
    from .pipeline import load_tagi_model

    if tagi_dir:
        return load_tagi_model(model_id, tagi_dir, trainable=trainable)
    fusion = None if args is None or args.fusion is None else args.fusion == "on"
    return load_tagi_model(
        model_id,
        r=args.r,
        lora_alpha=args.lora_alpha,
        target_modules=args.target_modules,
        instruction_fusion=fusion,
        max_instruction_length=args.max_instruction_length,
        instruction_encoder=args.instruction_encoder,
    )


# ---------------------------------------------------------------------------------------------------- commands
def cmd_train(args) -> None:
    import datasets

    from .data.pretraining import pretraining_dataset
    from .pipeline import train_stage, training_arguments

    output = Path(args.output_dir)
    if output.is_dir() and any(output.iterdir()) and not args.overwrite:
        raise SystemExit(f"error: {output} is not empty; pass --overwrite to write into it.")
    model, tokenizer = load_tagi(args.model, args.init, args, trainable=True)
    examples = load_examples(args.data, "train", args.max_instances, args.seed, args.num_pos_examples)
    if args.stage == "pretrain":
        texts = [" ".join(x for x in (e["instruction"], e["input"], e["output"]) if x) for e in examples]
        if args.data == "synthetic":
            from .data.synthetic import SyntheticSuite

            texts = SyntheticSuite(seed=args.seed).pretraining_texts(max(1000, len(examples)), seed=args.seed)
        train_ds = pretraining_dataset(datasets.Dataset.from_dict({"text": texts}), seed=args.seed)
    else:
        train_ds = datasets.Dataset.from_list(examples)
    training_args = training_arguments(
        output,
        stage=args.stage,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        kd_temperature=args.kd_temperature,
        lambda_kl=args.lambda_kl,
        lambda_ins=args.lambda_ins,
        group_by=args.group_by,
        teacher_loras=args.teacher_loras,
        logging_steps=max(1, args.max_steps // 20),
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        overwrite_teachers=args.overwrite,
        seed=args.seed,
        use_cpu=args.cpu,
    )
    teachers = args.teachers if args.stage == "distill" else None
    train_stage(model, tokenizer, training_args, train_ds, teachers=teachers, resume_from_checkpoint=args.resume)
    if args.stage != "teachers":
        model.save_pretrained(output / "tagi", overwrite=args.overwrite)
        print(f"TAGI checkpoint: {output / 'tagi'}")
    else:
        print(f"Teacher LoRAs: {output / 'teachers'}")


def cmd_generate_adapter(args) -> None:
    from .pipeline import generate_adapters

    model, tokenizer = load_tagi(args.model, args.tagi)
    adapters = generate_adapters(
        model, tokenizer, [args.instruction], generator=args.tagi, base_model_name_or_path=args.model
    )
    adapter = adapters[args.instruction]
    path = adapter.save_lora(args.out, base_model_name_or_path=args.model, overwrite=args.overwrite)
    print(f"LoRA adapter: {path}")
    if args.push_to:
        url = adapter.push_to_hub(args.push_to, generator=args.tagi, base_model_name_or_path=args.model)
        print(f"Pushed: {url}")


def quickstart_paths(model: str | None, tagi: str | None, need_tagi: bool) -> tuple[str, str | None]:
    """--model / --tagi, defaulting to the folders `peft-tagi quickstart` writes when --model is not given."""
    from .predict import QUICKSTART_BASE, QUICKSTART_TAGI

    if model is None:
        model, tagi = str(QUICKSTART_BASE), tagi or str(QUICKSTART_TAGI)
        missing = [path for path in (model, tagi) if not Path(path).is_dir()]
        if missing:
            raise SystemExit(
                f"error: {missing[0]} not found. Without --model this command uses the quickstart's output in the "
                "current folder: run `peft-tagi quickstart` first, or pass --model BASE --tagi CHECKPOINT."
            )
    if need_tagi and tagi is None:
        raise SystemExit("error: --instruction needs a TAGI checkpoint: pass --tagi CHECKPOINT (or --adapter FOLDER).")
    return model, tagi


def cmd_predict(args) -> None:
    from .pipeline import generate_adapters, generate_outputs, load_base_model
    from .predict import load_adapter_folder, read_inputs
    from .tokenizer import unknown_words_message

    if (args.instruction is None) == (args.adapter is None):
        raise SystemExit("error: pass exactly one of --instruction TEXT and --adapter FOLDER.")
    if (args.input is None) == (args.input_file is None):
        raise SystemExit("error: pass inputs with --input TEXT (repeatable) or --input-file FILE ('-' for stdin).")
    try:
        inputs = args.input if args.input is not None else read_inputs(args.input_file)
        adapter = load_adapter_folder(args.adapter) if args.adapter else None
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    if not inputs:
        raise SystemExit(f"error: {args.input_file} holds no input.")
    model_id, tagi_dir = quickstart_paths(args.model, args.tagi, need_tagi=adapter is None)

    if tagi_dir is None:
        from peft import PeftModel

        # A LoRA folder without its generator: plain PEFT, as any user of the exported adapter would load it.
        base, tokenizer = load_base_model(model_id)
        model = PeftModel.from_pretrained(base, args.adapter)
        if adapter.instruction_states is not None:
            logger.warning(
                "%s was generated with instruction fusion; without --tagi it runs as a plain LoRA, which drops "
                "fusion. Pass --tagi CHECKPOINT (the generator) for full fidelity.",
                args.adapter,
            )
        context = contextlib.nullcontext
    else:
        model, tokenizer = load_tagi(model_id, tagi_dir)
        if adapter is None:
            adapters = generate_adapters(
                model, tokenizer, [args.instruction], generator=tagi_dir, base_model_name_or_path=model_id
            )
            adapter = adapters[args.instruction]

        def context():
            return model.use_adapter(adapter)

    model.eval()
    message = unknown_words_message(tokenizer, "\n".join(inputs), what="inputs")
    if message:
        logger.warning(message)
    outputs = generate_outputs(
        model,
        tokenizer,
        inputs,
        context=context,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
    )
    if args.output and args.output.endswith(".jsonl"):
        instruction = adapter.instruction if adapter is not None else None
        rows = [{"instruction": instruction, "input": x, "output": y} for x, y in zip(inputs, outputs)]
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    else:
        # One output per line: a newline inside an output would shift every later line.
        text = "".join(" ".join(output.splitlines()) + "\n" for output in outputs)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text, encoding="utf-8")
        logger.info("Wrote %d outputs to %s", len(outputs), args.output)
    else:
        sys.stdout.write(text)


def cmd_demo(args) -> None:
    try:
        from .demo import build_demo
    except ImportError as err:
        raise SystemExit(
            f'error: the demo needs Gradio ({err}); install it with: pip install "peft-tagi[demo]"'
        ) from err

    from .predict import QUICKSTART_EXAMPLES

    model_id, tagi_dir = quickstart_paths(args.model, args.tagi, need_tagi=True)
    model, tokenizer = load_tagi(model_id, tagi_dir)
    model.eval()
    # The examples are tasks of the quickstart's suite: offered with its model only.
    examples = [(ins, "\n".join(inputs)) for ins, inputs, _ in QUICKSTART_EXAMPLES] if args.model is None else None
    app = build_demo(
        model,
        tokenizer,
        model_id=model_id,
        tagi_id=tagi_dir,
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        examples=examples,
    )
    # 127.0.0.1 only: the page runs a model on whatever it is sent, so it is not exposed to the network.
    app.launch(
        server_name="127.0.0.1",
        server_port=args.port,
        share=False,
        prevent_thread_lock=True,
        quiet=True,
        ssr_mode=False,  # server-side rendering needs Node.js; the plain page needs nothing beyond Python
    )
    print(f"peft-tagi demo running at http://127.0.0.1:{app.server_port} (Ctrl+C stops it)", flush=True)
    try:
        app.block_thread()
    finally:
        app.close()


def cmd_export(args) -> None:
    """Merge an exported task LoRA into the base model and save a standalone transformers model."""
    from peft import PeftModel

    from .pipeline import load_base_model
    from .serialization import atomic_write_dir

    base, tokenizer = load_base_model(args.model)
    merged = PeftModel.from_pretrained(base, args.adapter).merge_and_unload()

    def write(tmp: Path) -> None:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    atomic_write_dir(Path(args.out), write, overwrite=args.overwrite)
    print(f"Merged model: {args.out}")


def cmd_evaluate(args) -> None:
    from .pipeline import score, serve_by_instruction

    model, tokenizer = load_tagi(args.model, args.tagi)
    model.eval()
    examples = load_examples(args.data, args.split, args.max_instances, args.seed, args.num_pos_examples)
    predictions = serve_by_instruction(
        model,
        tokenizer,
        examples,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
    )
    scores = score(predictions, examples)
    print(f"ROUGE-L {scores['rougeL']:.2f}  exact match {scores['exact_match']:.2f}  ({len(examples)} examples)")
    for task, task_scores in sorted(scores["per_task"].items()):
        print(f"  {task:<50} ROUGE-L {task_scores['rougeL']:6.2f}  EM {task_scores['exact_match']:6.2f}")
    if args.output:
        Path(args.output).write_text(json.dumps(scores, indent=2) + "\n")


def cmd_quickstart(args) -> None:
    from .quickstart import QuickstartConfig, format_table, run_quickstart

    if args.show_vocabulary:
        from .data.synthetic import SyntheticSuite

        words = SyntheticSuite(seed=args.seed).vocabulary()
        print(f"The quickstart's tokenizer knows these {len(words)} words and marks (any other word is unknown):")
        print(" ".join(words))
        return
    options = {"base_model": args.base_model, "instruction_encoder": args.instruction_encoder, "seed": args.seed}
    config = QuickstartConfig.fast(**options) if args.fast else QuickstartConfig(**options)
    results = run_quickstart(args.output_dir, config, overwrite=args.overwrite)
    print(format_table(results))
    print(f"\nTimings (s): {results['timings_s']}")
    print(f"Wrote {Path(args.output_dir) / 'results.json'} and {Path(args.output_dir) / 'results.png'}")


# ---------------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peft-tagi", description="TAGI: generate LoRA adapters from task instructions (a PEFT method)."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, model_required=True):
        p.add_argument("--config", help="YAML or JSON file of options (flag names as keys); flags override it.")
        p.add_argument("--model", required=model_required, help="base model: a Hub id or a local path")
        p.add_argument("--seed", type=int, default=0)

    def data(p):
        p.add_argument("--data", default="synthetic", help="'synthetic', 'sni:PATH' or 'p3:PATH_OR_ID'")
        p.add_argument("--max-instances", type=int, default=100, help="instances per task")
        p.add_argument("--num-pos-examples", type=int, default=0, help="SNI: positive examples in the instruction")

    train = sub.add_parser("train", help="train one stage: teachers, pretrain or distill")
    common(train)
    data(train)
    train.add_argument("--stage", required=True, choices=["teachers", "pretrain", "distill"])
    train.add_argument("--output-dir", required=True)
    train.add_argument("--init", help="TAGI checkpoint to continue from (e.g. the pretrain stage's output/tagi)")
    train.add_argument("--teachers", help="distill: the folder written by the teachers stage (output/teachers)")
    train.add_argument("--resume", help="resume from a Trainer checkpoint folder")
    train.add_argument("--max-steps", type=int, default=1000)
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--gradient-accumulation-steps", type=int, default=1)
    train.add_argument("--learning-rate", type=float, default=1e-4)
    train.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: none)")
    train.add_argument("--r", type=int, default=32)
    train.add_argument("--lora-alpha", type=float, default=64)
    train.add_argument("--target-modules", nargs="+", default=None)
    train.add_argument("--fusion", choices=["on", "off"], default=None, help="instruction fusion (seq2seq default on)")
    train.add_argument("--max-instruction-length", type=int, default=1024)
    train.add_argument(
        "--instruction-encoder",
        help="a frozen text encoder that reads the instructions: Hub id, folder or 'minilm' (extra [encoder]); "
        "default: the base model's own encoder",
    )
    train.add_argument("--kd-temperature", type=float, default=2.0)
    train.add_argument("--lambda-kl", type=float, default=5.0)
    train.add_argument("--lambda-ins", default="sigmoid", help="'sigmoid' or a number")
    train.add_argument("--group-by", choices=["task_name", "category"], default="task_name")
    train.add_argument(
        "--teacher-loras",
        choices=["both", "meta", "bank"],
        default="both",
        help="what --stage teachers trains: both (default); meta, the meta-train LoRA alone (enough to distil with "
        "--lambda-ins 0); bank, the per-task LoRAs alone (enough with --lambda-kl 0)",
    )
    train.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    train.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")
    train.set_defaults(func=cmd_train)

    gen = sub.add_parser("generate-adapter", help="write the LoRA generated for one instruction")
    common(gen)
    gen.add_argument("instruction", help="the task instruction, in natural language")
    gen.add_argument("--tagi", required=True, help="TAGI checkpoint folder (or Hub id)")
    gen.add_argument("--out", required=True, help="folder for the standard PEFT LoRA")
    gen.add_argument("--push-to", help="also push the LoRA to this Hub repo (user/repo)")
    gen.add_argument("--overwrite", action="store_true")
    gen.set_defaults(func=cmd_generate_adapter)

    predict = sub.add_parser(
        "predict",
        help="outputs of a task on your inputs, from its instruction (or a saved adapter)",
        description="Generate the task's adapter from --instruction (or load --adapter) and write one output per "
        "input, in input order. Without --model and --tagi it uses the quickstart's model in ./tagi-quickstart.",
        epilog='example: peft-tagi predict --instruction "reverse the words" --input "cat dog sun" --input "red fox"',
    )
    predict.add_argument("--config", help="YAML or JSON file of options (flag names as keys); flags override it.")
    predict.add_argument("--model", help="base model: a Hub id or a local path (default: tagi-quickstart/work/base)")
    predict.add_argument(
        "--tagi",
        help="TAGI checkpoint folder or Hub id (default with the quickstart's model: tagi-quickstart/work/tagi)",
    )
    task = predict.add_mutually_exclusive_group()
    task.add_argument("--instruction", help="the task instruction, in natural language")
    task.add_argument(
        "--adapter",
        help="a LoRA folder (written by generate-adapter, or any PEFT LoRA) instead of --instruction; "
        "without --tagi it runs as a plain PEFT LoRA",
    )
    source = predict.add_mutually_exclusive_group()
    source.add_argument("--input", action="append", help="one task input; repeat the flag for several")
    source.add_argument(
        "--input-file",
        help="inputs, one per line, or JSONL with an 'input' field per row (.jsonl or lines starting with '{'); "
        "'-' reads stdin",
    )
    predict.add_argument(
        "--output",
        help="write here instead of stdout: F.jsonl gives rows {instruction, input, output}; any other name, one "
        "output per line",
    )
    predict.add_argument("--batch-size", type=int, default=16, help="inputs per generate call (default 16)")
    predict.add_argument(
        "--max-new-tokens", type=int, default=32, help="most tokens generated per output (default 32)"
    )
    predict.add_argument("--num-beams", type=int, default=1, help="beam search width (default 1: greedy)")
    predict.set_defaults(func=cmd_predict)

    export = sub.add_parser("export", help="merge an exported task LoRA into the base model (standalone model)")
    common(export)
    export.add_argument("adapter", help="a LoRA folder written by generate-adapter")
    export.add_argument("--out", required=True)
    export.add_argument("--overwrite", action="store_true")
    export.set_defaults(func=cmd_export)

    evaluate = sub.add_parser("evaluate", help="ROUGE-L / exact match of a TAGI checkpoint on a data set")
    common(evaluate)
    data(evaluate)
    evaluate.add_argument("--tagi", required=True, help="TAGI checkpoint folder")
    evaluate.add_argument("--split", default="test", help="SNI: train or test; synthetic: train or heldout")
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--max-new-tokens", type=int, default=32)
    evaluate.add_argument("--num-beams", type=int, default=1)
    evaluate.add_argument("--output", help="write the scores as JSON here")
    evaluate.set_defaults(func=cmd_evaluate)

    quick = sub.add_parser("quickstart", help="the whole pipeline on the embedded default, with a held-out report")
    quick.add_argument("--config", help="YAML or JSON file of options")
    quick.add_argument("--output-dir", default="tagi-quickstart")
    quick.add_argument("--fast", action="store_true", help="smoke run (under 2 minutes)")
    quick.add_argument(
        "--base-model",
        choices=("from-scratch", "embedded"),  # quickstart.BASE_MODELS, without importing torch for --help
        default="embedded",
        help="embedded (default): the small BART shipped in the package; from-scratch: a small T5 pretrained inside "
        "the run (with --instruction-encoder none, the default before the shipped base)",
    )
    quick.add_argument(
        "--instruction-encoder",
        default="minilm",
        help="the frozen text encoder that reads the instructions: 'minilm' (default: "
        "sentence-transformers/all-MiniLM-L6-v2, extra [encoder]), a Hub id or a folder, or 'none' for the base "
        "model's own encoder; with an encoder, three quarters of the training instructions are reworded in words "
        "outside the suite's vocabulary (QuickstartConfig.free_wordings)",
    )
    quick.add_argument("--overwrite", action="store_true")
    quick.add_argument(
        "--seed", type=int, default=0, help="seed of the task split, the data and every initialisation (default 0)"
    )
    quick.add_argument(
        "--show-vocabulary",
        action="store_true",
        help="print the words the quickstart's closed-vocabulary tokenizer knows (instructions must use them) and exit",
    )
    quick.set_defaults(func=cmd_quickstart)

    demo = sub.add_parser(
        "demo",
        help="a local web page: type an instruction, compare the adapter's outputs with the base model's",
        description="Start a Gradio page on http://127.0.0.1:PORT (this machine only): type an instruction and "
        "inputs, see the generated adapter's outputs next to the frozen base model's, unknown-word warnings, and "
        'download the adapter as a zipped LoRA folder. Needs: pip install "peft-tagi[demo]". Without --model and '
        "--tagi it uses the quickstart's model in ./tagi-quickstart.",
    )
    demo.add_argument("--config", help="YAML or JSON file of options (flag names as keys); flags override it.")
    demo.add_argument("--model", help="base model: a Hub id or a local path (default: tagi-quickstart/work/base)")
    demo.add_argument("--tagi", help="TAGI checkpoint folder or Hub id (default: tagi-quickstart/work/tagi)")
    demo.add_argument("--port", type=int, help="port on 127.0.0.1 (default: the first free one from 7860)")
    demo.add_argument("--max-new-tokens", type=int, default=32, help="most tokens generated per output (default 32)")
    demo.add_argument("--num-beams", type=int, default=1, help="beam search width (default 1: greedy)")
    demo.set_defaults(func=cmd_demo)
    return parser


def _option_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path = _option_value(argv, "--config")
    command = next((arg for arg in argv if arg in SUBCOMMANDS), None)
    if config_path and command:
        # Options from the file become defaults of the subcommand (required flags included); flags still win.
        file_options = load_config_file(config_path)
        subparser = parser._subparsers._group_actions[0].choices[command]
        known = {action.dest for action in subparser._actions}
        unknown = sorted(set(file_options) - known)
        if unknown:
            raise SystemExit(f"error: {config_path} has unknown options {unknown}; see `peft-tagi {command} --help`.")
        subparser.set_defaults(**file_options)
        for action in subparser._actions:
            if action.dest in file_options:
                action.required = False
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # peft 0.21's PeftModel reads transformers 5's deprecated `is_gradient_checkpointing` for every model it wraps: a
    # warning about peft's code, not the user's, repeated at every load.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # The commands show their own progress (a bar per training stage, per generation loop); transformers' bars for
    # loading and writing each small model, and rouge_score's INFO line, would only bury it.
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    logging.getLogger("absl").setLevel(logging.WARNING)
    args = parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
