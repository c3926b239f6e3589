"""Files on disk: saving loses nothing, reading fails clearly.

No folder a user saved is replaced unless asked, and no crash leaves a half-written one: `atomic_write_dir` builds a
folder next to its destination and renames it into place. `save_pretrained` gives `PeftModel.save_pretrained` the
same guarantees for TAGI models; `install_save_guard` routes TAGI models through it and leaves every other PEFT
method on peft's own code. `load_safetensors` and `check_safetensors` name the file and the fix when one is truncated
or corrupt, where safetensors only says "Error while deserializing header".
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from peft import PeftModel
from peft.utils import CONFIG_NAME, PeftType
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

# Set by TagiTrainer around its own saves: the Trainer owns its output and checkpoint folders and writes into them
# on every save (transformers 5 has no overwrite flag to honour).
_overwrite_allowed: contextvars.ContextVar[bool] = contextvars.ContextVar("peft_tagi_overwrite", default=False)


@contextlib.contextmanager
def overwrite_allowed() -> Iterator[None]:
    """Within this block, `save_pretrained` of a TAGI model writes into non-empty folders as if `overwrite=True`."""
    token = _overwrite_allowed.set(True)
    try:
        yield
    finally:
        _overwrite_allowed.reset(token)


def _unreadable(path: Path, err: Exception) -> ValueError:
    return ValueError(
        f"{path} is not a readable safetensors file ({err}); it is truncated or corrupt: save or download it again."
    )


def load_safetensors(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file; a damaged one raises ValueError naming it."""
    try:
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise _unreadable(path, err) from err
    # The tensors of a CPU load share one buffer laid out after the file's header, so most start off the 64-byte
    # boundary torch's own allocations have; on some CPUs (AMD EPYC here) the BLAS kernels then take another path
    # and a loaded adapter's outputs differ from the generated one's in the last bits. A copy is aligned.
    return {name: tensor if tensor.data_ptr() % 64 == 0 else tensor.clone() for name, tensor in state.items()}


def check_safetensors(path: Path) -> None:
    """Raise ValueError naming `path` when its header or size is damaged (reads the header only)."""
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError, ValueError) as err:
        raise _unreadable(path, err) from err


def _refuse_non_folder(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder; choose another path.")


def _new_folder(path: Path) -> Path:
    """An empty temporary folder beside `path`, with the permissions a plain `mkdir` would give it (mkdtemp's are
    owner-only, and the folder is renamed into place as the user's)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())
    return tmp


def _umask() -> int:
    # os.umask can only be read by setting it, which would race with other threads (the demo serves several).
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def atomic_write_dir(path: Path, write: Callable[[Path], None], overwrite: bool = False) -> None:
    """Build a folder with `write(tmp_dir)` next to `path`, then move it into place.

    A non-empty existing `path` is kept unless `overwrite=True`; when replaced, the old folder is moved aside first
    and deleted only after the new one is in place, so a failure at any point leaves a complete folder behind.
    """
    path = Path(path)
    _refuse_non_folder(path)
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} is not empty; pass overwrite=True (or --overwrite) to replace it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_folder(path)
    try:
        write(tmp)
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "folder")
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_entries_into(new: Path, path: Path) -> None:
    """Move every entry of `new` into the non-empty folder `path`, replacing same-named entries, keeping the rest.

    The replaced entries go aside first (config first) and the new ones come in config last, so at every instant
    `path` holds either the old config with the old weights or no config at all: never a mismatched pair. The old
    entries are deleted only once the new ones are in place.
    """
    entries = sorted(new.iterdir(), key=lambda p: p.name == CONFIG_NAME)
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    for entry in reversed(entries):
        if (path / entry.name).exists():
            os.replace(path / entry.name, aside / entry.name)
    for entry in entries:
        os.replace(entry, path / entry.name)
    shutil.rmtree(aside, ignore_errors=True)


def save_pretrained(
    model: PeftModel, save_directory: str | os.PathLike, *args, overwrite: bool = False, **kwargs
) -> None:
    """`PeftModel.save_pretrained` for a TAGI model, which cannot lose a saved folder.

    Args:
        model (`PeftModel`): the TAGI model.
        save_directory (`str` or `os.PathLike`): the folder to write.
        overwrite (`bool`): allow writing into a non-empty folder. Entries the save writes (the adapter config,
            weights, model card, named-adapter subfolders) are replaced; anything else there is kept.
        *args, **kwargs: `PeftModel.save_pretrained`'s. `safe_serialization=False` is refused: TAGI writes
            safetensors only.

    The save is written to a temporary folder beside `save_directory` and moved into place only when complete: a
    new folder in one rename; into an existing folder file by file, config last, so that files other processes
    write there meanwhile (a DDP rank's RNG state in a checkpoint) are kept.
    """
    call = inspect.signature(_PEFT_SAVE_PRETRAINED).bind(model, save_directory, *args, **kwargs)
    call.apply_defaults()
    if not call.arguments["safe_serialization"]:
        raise ValueError(
            "safe_serialization=False would write a pickled adapter_model.bin; TAGI models are saved as "
            "safetensors only. Drop the argument."
        )
    if not call.arguments["is_main_process"]:
        return  # the main process writes the folder; peft itself writes nothing here either
    path = Path(save_directory)
    _refuse_non_folder(path)
    overwrite = overwrite or _overwrite_allowed.get()
    non_empty = path.is_dir() and any(path.iterdir())
    if non_empty and not overwrite:
        raise FileExistsError(
            f"{path} is not empty; pass overwrite=True to save_pretrained to replace the adapter there "
            "(other files are kept), or choose an empty folder."
        )

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_folder(path)
    try:
        if (path / "README.md").is_file():
            # peft updates an existing model card in place; give it the current one so nothing in it is lost.
            shutil.copy2(path / "README.md", tmp / "README.md")
        call.arguments["save_directory"] = str(tmp)
        _PEFT_SAVE_PRETRAINED(*call.args, **call.kwargs)
        if not path.exists():
            try:
                os.replace(tmp, path)
                return
            except OSError:
                if not path.is_dir():
                    raise
        # An existing folder is never swapped out, even an empty one: another process (a DDP rank writing its RNG
        # state into a checkpoint) may be writing into it, and a swap would delete what it wrote.
        _move_entries_into(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_PEFT_SAVE_PRETRAINED = getattr(PeftModel.save_pretrained, "_peft_tagi_original", PeftModel.save_pretrained)


def install_save_guard() -> None:
    """Route `PeftModel.save_pretrained` of TAGI models through `save_pretrained` (once; other methods untouched).

    What a TAGI checkpoint holds is peft's business and goes through peft's per-method hooks: `TagiModel`'s
    `_remove_adapter_name_from_key` maps the hypernetwork's keys both ways, and peft's structural selection
    (`BaseTuner._get_adapter_state_dict`) already takes every `tagi_*` container. How the folder reaches the disk has
    no hook in peft 0.21: `save_pretrained` writes into the folder file by file, over whatever was there. Refusing a
    non-empty folder and moving a complete save into place is therefore done here, around peft's own method, which
    still writes the files.
    """
    if getattr(PeftModel.save_pretrained, "_peft_tagi_guard", False):
        return

    @functools.wraps(_PEFT_SAVE_PRETRAINED)
    def guarded(self: PeftModel, save_directory, *args, **kwargs):
        if self.peft_type == PeftType.TAGI:
            return save_pretrained(self, save_directory, *args, **kwargs)
        return _PEFT_SAVE_PRETRAINED(self, save_directory, *args, **kwargs)

    guarded.__doc__ = (_PEFT_SAVE_PRETRAINED.__doc__ or "") + (
        "\n        peft-tagi: for a TAGI model this is `peft_tagi.serialization.save_pretrained`: a non-empty folder is"
        "\n        refused unless `overwrite=True`, and the save is moved into place only when complete.\n"
    )
    guarded._peft_tagi_guard = True
    guarded._peft_tagi_original = _PEFT_SAVE_PRETRAINED
    PeftModel.save_pretrained = guarded
