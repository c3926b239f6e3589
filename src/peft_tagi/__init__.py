"""peft-tagi: TAGI (Task Adapters Generation from Instructions) as a PEFT method.

Importing this package registers the PEFT method "TAGI", so `get_peft_model(model, TagiConfig(...))`,
`PeftConfig.from_pretrained` and `PeftModel.from_pretrained` work on TAGI checkpoints. It also routes
`PeftModel.save_pretrained` of TAGI models (only) through `peft_tagi.serialization.save_pretrained`, which refuses a
non-empty folder unless `overwrite=True` and moves the save into place only when complete.
"""

from peft.utils import PeftType


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
from .layer import TagiLinear  # noqa: E402
from .model import TagiModel, TaskWeights  # noqa: E402
from .serialization import install_save_guard  # noqa: E402
from .trainer import TagiTrainer, TagiTrainingArguments  # noqa: E402

if PeftType.TAGI not in PEFT_TYPE_TO_TUNER_MAPPING:
    register_peft_method(name="tagi", config_cls=TagiConfig, model_cls=TagiModel, prefix="tagi_")
install_save_guard()

__version__ = "0.1.0"

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
