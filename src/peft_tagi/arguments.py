"""Command-line arguments of the training scripts, as transformers' example scripts parse theirs.

`examples/train_sni.py` and `examples/train_p3.py` share everything here and differ only in their data:

- `TagiModelArguments`: the base model and every `TagiConfig` option (defaults and help read from `TagiConfig`).
- `StageArguments`: the step count of each stage (0 skips a stage).
- `parse_arguments`: `HfArgumentParser` over those, the script's data arguments and `TagiTrainingArguments`, so every
  Trainer flag works (`--bf16`, `--gradient_checkpointing`, `--fsdp`, `--deepspeed`, `--report_to`, ...); one
  `.json` / `.yaml` file argument holds them all instead.
- `setup_logging`: transformers' examples' logging set-up.

The scripts then train with `peft_tagi.pipeline.run_stages` (teachers -> pretrain -> distill in subfolders of
`--output_dir`, resumable with `--resume_from_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import logging as std_logging
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import transformers
from transformers import HfArgumentParser
from transformers.utils import logging

from .config import TagiConfig
from .trainer import STAGES, TagiTrainingArguments

logger = logging.get_logger(__name__)

_TAGI_FIELDS = {f.name: f for f in dataclasses.fields(TagiConfig)}
_RESUME_FLAGS = ("--resume_from_checkpoint", "--resume-from-checkpoint")
_TRUE = ("true", "True", "1", "yes")


def _tagi_option(name: str, **overrides: Any) -> Any:
    """A dataclass field with the default and help of `TagiConfig.<name>`, so that the two cannot drift apart."""
    source = _TAGI_FIELDS[name]
    return field(default=overrides.get("default", source.default), metadata={"help": source.metadata["help"]})


@dataclass
class TagiModelArguments:
    """The base model and the TAGI adapter put on it.

    Args:
        model_name_or_path (`str`): a Hub id or a local folder of a seq2seq (T5, BART, ...) or causal LM.
        tokenizer_name (`str`, *optional*): the tokenizer's Hub id or folder; defaults to `model_name_or_path`.
        dtype (`str`, *optional*): dtype the base weights are loaded in (`"auto"`, `"bfloat16"`, `"float32"`, ...);
            transformers' default when unset. Mixed precision is the Trainer's `--bf16` / `--fp16` instead.
        r, lora_alpha, lora_dropout, target_modules, instruction_fusion, max_instruction_length,
        instruction_overflow, hypernetwork_hidden_size, module_embedding_dim, pooling, pooling_queries, instruction_encoder:
            `TagiConfig`'s options.
    """

    model_name_or_path: str = field(metadata={"help": "Base model: a Hub id or a local folder."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer if not the model's."})
    dtype: str | None = field(default=None, metadata={"help": "Base weights dtype: auto, bfloat16, float32, ..."})
    r: int = _tagi_option("r")
    lora_alpha: float = _tagi_option("lora_alpha")
    lora_dropout: float = _tagi_option("lora_dropout")
    # One type per flag: a list of module names (`--target_modules q v`); a regex goes in a config file or the API.
    target_modules: list[str] | None = _tagi_option("target_modules")
    instruction_fusion: bool | None = _tagi_option("instruction_fusion")
    max_instruction_length: int = _tagi_option("max_instruction_length")
    instruction_overflow: str = _tagi_option("instruction_overflow")
    hypernetwork_hidden_size: int = _tagi_option("hypernetwork_hidden_size")
    module_embedding_dim: int = _tagi_option("module_embedding_dim")
    pooling: str = _tagi_option("pooling")
    pooling_queries: int = _tagi_option("pooling_queries")
    instruction_encoder: str | None = _tagi_option("instruction_encoder")

    def tagi_options(self) -> dict[str, Any]:
        """The `TagiConfig` options given here (for `peft_tagi.pipeline.load_tagi_model`)."""
        return {name: getattr(self, name) for name in _TAGI_FIELDS if hasattr(self, name)}


@dataclass
class StageArguments:
    """Training steps of each stage; 0 skips the stage.

    Args:
        teachers_steps (`int`): stage `teachers` (meta-train LoRA + one LoRA per task or category).
        pretrain_steps (`int`): stage `pretrain` (hypernetwork on the training text split into three spans).
        distill_steps (`int`): stage `distill` (hypernetwork with CE + KL + ΔW alignment to the teachers).
    """

    teachers_steps: int = field(default=5000, metadata={"help": "Steps of stage teachers (0 skips it)."})
    pretrain_steps: int = field(default=2000, metadata={"help": "Steps of stage pretrain (0 skips it)."})
    distill_steps: int = field(default=20000, metadata={"help": "Steps of stage distill (0 skips it)."})

    def __post_init__(self) -> None:
        for stage in STAGES:
            if self.steps(stage) < 0:
                raise ValueError(f"--{stage}_steps must be >= 0 (0 skips the stage), got {self.steps(stage)}.")

    def steps(self, stage: str) -> int:
        return getattr(self, f"{stage}_steps")


def _with_bare_resume_flag(argv: list[str]) -> list[str]:
    """`--resume_from_checkpoint` with no value means `true` (the field is a string for the Trainer's sake)."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg in _RESUME_FLAGS and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            argv.insert(i + 1, "true")
    return argv


def _numbers_from_strings(dataclass_types, values: dict[str, Any]) -> dict[str, Any]:
    """YAML reads `1e-4` as a string (its floats need a dot); give int and float options their type, as flags get."""
    numeric = {}
    for dataclass_type in dataclass_types:
        for name, hint in typing.get_type_hints(dataclass_type).items():
            kinds = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
            if len(kinds) == 1 and kinds[0] in (int, float):
                numeric[name] = kinds[0]
    converted = dict(values)
    for name, value in values.items():
        if name in numeric and isinstance(value, str):
            try:
                converted[name] = numeric[name](value)
            except ValueError:
                raise ValueError(f"Option {name} must be {numeric[name].__name__}, got {value!r}.") from None
    return converted


def parse_arguments(
    data_arguments: type, defaults: dict[str, Any] | None = None, argv: list[str] | None = None
) -> tuple[TagiModelArguments, Any, StageArguments, TagiTrainingArguments]:
    """Parse the command line (or one `.json` / `.yaml` file) into the four argument dataclasses.

    Args:
        data_arguments: the script's own dataclass of data options.
        defaults: the script's defaults for fields of any of the four (e.g. `{"group_by": "category"}`); a value
            on the command line or in the file wins.
        argv: the arguments; `sys.argv[1:]` when None.

    Raises:
        FileExistsError: `--output_dir` already holds a run and `--resume_from_checkpoint` is not given.
    """
    argv = _with_bare_resume_flag(sys.argv[1:] if argv is None else argv)
    # No abbreviations: among some 150 options a misspelt flag must be an error, not the option it happens to prefix.
    parser = HfArgumentParser(
        (TagiModelArguments, data_arguments, StageArguments, TagiTrainingArguments), allow_abbrev=False
    )
    defaults = dict(defaults or {})
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        path = Path(argv[0])
        if not path.is_file():
            raise FileNotFoundError(f"Argument file {path} not found; pass options as flags or an existing file.")
        if path.suffix == ".json":
            import json

            values = json.loads(path.read_text())
        else:
            import yaml

            values = yaml.safe_load(path.read_text())
        values = _numbers_from_strings(parser.dataclass_types, values)
        # parse_dict refuses unknown keys, so a misspelt option is an error rather than silently ignored.
        model_args, data_args, stage_args, training_args = parser.parse_dict({**defaults, **values})
    else:
        parser.set_defaults(**defaults)
        model_args, data_args, stage_args, training_args = parser.parse_args_into_dataclasses(argv)
    check_output_dir(training_args)
    resume_checkpoint(training_args)  # a checkpoint outside this run is refused before anything loads
    return model_args, data_args, stage_args, training_args


def check_output_dir(training_args: TagiTrainingArguments) -> None:
    """Refuse to start a fresh run over an earlier one: its checkpoints would be mixed with the new ones."""
    if training_args.resume_from_checkpoint:
        return
    output = Path(training_args.output_dir)
    previous = [output / stage for stage in STAGES if (output / stage).is_dir() and any((output / stage).iterdir())]
    if previous:
        raise FileExistsError(
            f"{output} already holds a run ({', '.join(p.name for p in previous)}). Pass --resume_from_checkpoint "
            "to continue it (finished stages are skipped), or choose another --output_dir."
        )


def setup_logging(training_args: TagiTrainingArguments) -> None:
    """Log as transformers' examples do: to stdout, INFO on the main process, warnings only on the others."""
    std_logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[std_logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    std_logging.getLogger("peft_tagi").setLevel(log_level)
    std_logging.getLogger("__main__").setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    logger.warning(
        f"Process rank: {training_args.process_index}, device: {training_args.device}, n_gpu: {training_args.n_gpu}, "
        f"distributed: {training_args.parallel_mode.value == 'distributed'}, bf16: {training_args.bf16}"
    )


def resume_checkpoint(training_args: TagiTrainingArguments) -> tuple[str, Path] | None:
    """(stage, checkpoint) when `--resume_from_checkpoint` names a checkpoint folder of this run; None for `true` or
    unset. A checkpoint outside `--output_dir/<stage>/` is refused."""
    resume = training_args.resume_from_checkpoint
    if not resume or resume in _TRUE:
        return None
    checkpoint = Path(resume).resolve()
    output = Path(training_args.output_dir).resolve()
    for stage in STAGES:
        if checkpoint.parent == output / stage:
            return stage, checkpoint
    raise ValueError(
        f"--resume_from_checkpoint {resume} is not a checkpoint of this run; pass {output}/<stage>/checkpoint-N "
        f"(stages: {', '.join(STAGES)}), or `true` to resume from the newest complete checkpoint."
    )
