"""peft-tagi: TAGI (Task Adapters Generation from Instructions) as a PEFT method.

Importing this package registers the PEFT method "TAGI", so `get_peft_model(model, TagiConfig(...))`,
`PeftConfig.from_pretrained` and `PeftModel.from_pretrained` work on TAGI checkpoints. It also routes
`PeftModel.save_pretrained` of TAGI models (only) through `peft_tagi.serialization.save_pretrained`, which refuses a
non-empty folder unless `overwrite=True` and moves the save into place only when complete.

`TagiTrainer` and `TagiTrainingArguments` are imported on first use (they bring transformers' Trainer), so that a
program that only serves adapters starts without them.
"""

import logging


class _KernelLookupFilter(logging.Filter):
    """Drops bitsandbytes' warning that its optional CPU kernel could not be fetched from the Hub.

    `peft.helpers` imports bitsandbytes whenever it is installed, quantized model or not, and bitsandbytes' CPU backend
    then asks the Hub for an accelerated 4-bit kernel, which an offline machine or an untrusted publisher refuses. The
    4-bit layers fall back to bitsandbytes' own kernels, so the warning says nothing a user can act on; every other
    bitsandbytes message passes. (peft_tagi's own bitsandbytes layers are imported only for a quantized base.)
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_KernelLookupFilter())

from peft.utils import PeftType  # noqa: E402


def _extend_peft_type() -> None:
    """Add the member TAGI to `peft.PeftType`, once: `register_peft_method` only accepts existing members."""
    if "TAGI" in PeftType.__members__:
        return
    member = str.__new__(PeftType, "TAGI")
    member._name_ = "TAGI"
    member._value_ = "TAGI"
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_["TAGI"] = member
    PeftType._value2member_map_["TAGI"] = member
    PeftType._member_names_.append("TAGI")
    type.__setattr__(PeftType, "TAGI", member)


_extend_peft_type()

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING  # noqa: E402
from peft.utils import register_peft_method  # noqa: E402

from .adapter import TaskAdapter  # noqa: E402
from .config import TAGI_TARGET_MODULES_MAPPING, TagiConfig  # noqa: E402
from .data.collator import TagiDataCollator  # noqa: E402
from .hypernetwork import TagiHypernetwork  # noqa: E402
from .layer import TagiLinear, TaskWeights  # noqa: E402
from .model import TagiModel  # noqa: E402
from .serialization import install_save_guard  # noqa: E402

if PeftType.TAGI not in PEFT_TYPE_TO_TUNER_MAPPING:
    register_peft_method(name="tagi", config_cls=TagiConfig, model_cls=TagiModel, prefix="tagi_")
install_save_guard()

__version__ = "0.1.0"

_TRAINER_NAMES = ("TagiTrainer", "TagiTrainingArguments")


def __getattr__(name: str):
    if name in _TRAINER_NAMES:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'peft_tagi' has no attribute {name!r}")


__all__ = [
    "TAGI_TARGET_MODULES_MAPPING",
    "TagiConfig",
    "TagiDataCollator",
    "TagiHypernetwork",
    "TagiLinear",
    "TagiModel",
    "TagiTrainer",
    "TagiTrainingArguments",
    "TaskAdapter",
    "TaskWeights",
]
