"""Clear errors for damaged adapter folders and Trainer checkpoints, instead of silent re-initialisation.

PEFT and transformers report a truncated file with the parser's message only (``SafetensorError: incomplete
metadata``, ``JSONDecodeError``, ``PytorchStreamReader failed``), and PEFT loads a weights file that lacks
some of an adapter's tensors with at most a warning (``load_adapter`` and ``Trainer`` resume: not even
that), leaving those tensors at their fresh initial values. This module:

* checks single files (``check_json_file``, ``check_safetensors_file``, ``check_torch_file``) and whole
  folders (``verify_adapter_folder``, ``verify_checkpoint``), raising :class:`CorruptFileError` with the path;
* on ``install()`` (done by ``import peft_lowrank_ext``) makes PEFT's config and weights loaders name the
  file when it cannot be parsed (for every PEFT method: only the error changes, never a successful load);
* gives this package's tuners :func:`check_loaded_adapter_keys`, which refuses a weights file that lacks
  any of the method's tensors, and, when the adapter is loaded for training from a ``Trainer`` checkpoint
  (resume), verifies the rest of that checkpoint before transformers reads it.
"""

from __future__ import annotations

import contextvars
import functools
import glob
import json
import os
import zipfile

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_SAFETENSORS_NAME = "adapter_model.safetensors"
ADAPTER_BIN_NAME = "adapter_model.bin"
TRAINER_STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
# Files or folders that hold optimizer state in a Trainer checkpoint (plain, accelerate, FSDP, DeepSpeed).
OPTIMIZER_PATTERNS = ("optimizer.pt", "optimizer.bin", "optimizer_*", "global_step*")
RNG_STATE_PATTERN = "rng_state*.pth"
# Files whose presence marks a folder as a Trainer checkpoint (not just an adapter folder).
TRAINER_MARKERS = (TRAINER_STATE_NAME, OPTIMIZER_NAME, SCHEDULER_NAME)

# (path, number of tensors) of the weights file PEFT read last in this context; consumed by the key check to
# name the file (trusted only when the state dict being loaded has that many tensors).
_last_weights_file: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar(
    "_last_weights_file", default=None)


class CorruptFileError(ValueError):
    """A file of an adapter folder or checkpoint is missing, truncated, unparsable or incomplete."""

    def __init__(self, path: str, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def check_json_file(path: str) -> dict:
    """Parse a JSON object file; raise naming the file if it is missing, truncated or not an object."""
    if not os.path.isfile(path):
        raise CorruptFileError(path, "file is missing")
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptFileError(path, f"is not valid JSON (truncated or corrupted?): {error}") from error
    if not isinstance(value, dict):
        raise CorruptFileError(path, f"must hold a JSON object, found {type(value).__name__}")
    return value


def check_safetensors_file(path: str) -> list[str]:
    """Tensor names of a safetensors file; raise naming the file if it is missing, truncated or unparsable.

    Reads the header only: a truncated file fails because its header no longer covers the data.
    """
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise CorruptFileError(path, "file is missing")
    try:
        with safe_open(path, framework="pt") as handle:
            return list(handle.keys())
    except Exception as error:  # safetensors raises its own SafetensorError (and OSError) types
        raise CorruptFileError(path, f"is not a readable safetensors file (truncated or corrupted?): {error}") \
            from error


def check_torch_file(path: str, deep: bool = False) -> None:
    """Raise naming the file if a ``torch.save`` archive is missing or truncated (``deep``: also CRCs)."""
    if not os.path.isfile(path):
        raise CorruptFileError(path, "file is missing")
    try:
        with zipfile.ZipFile(path) as archive:
            bad_member = archive.testzip() if deep else None
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise CorruptFileError(path, f"is not a readable torch.save archive (truncated or corrupted?): {error}") \
            from error
    if bad_member is not None:
        raise CorruptFileError(path, f"member {bad_member!r} fails its checksum (corrupted)")


def verify_adapter_folder(path: str) -> None:
    """Check that a ``save_pretrained`` folder has a parsable config and weights file."""
    path = str(path)
    if not os.path.isdir(path):
        raise CorruptFileError(path, "adapter folder is missing")
    config = check_json_file(os.path.join(path, ADAPTER_CONFIG_NAME))
    if "peft_type" not in config:
        raise CorruptFileError(os.path.join(path, ADAPTER_CONFIG_NAME), "has no 'peft_type' entry")
    safetensors_path = os.path.join(path, ADAPTER_SAFETENSORS_NAME)
    bin_path = os.path.join(path, ADAPTER_BIN_NAME)
    if os.path.isfile(safetensors_path):
        check_safetensors_file(safetensors_path)
    elif os.path.isfile(bin_path):
        check_torch_file(bin_path)
    else:
        raise CorruptFileError(safetensors_path, f"file is missing (and there is no {ADAPTER_BIN_NAME} either)")


def _matches(folder: str, pattern: str) -> list[str]:
    return sorted(glob.glob(os.path.join(glob.escape(folder), pattern)))


def verify_trainer_files(path: str, deep: bool = False) -> None:
    """Check the Trainer part of a checkpoint: state, optimizer, scheduler and RNG files present and readable.

    transformers silently restarts the optimizer and scheduler when ``optimizer.pt`` or ``scheduler.pt`` is
    missing, and the RNG streams when ``rng_state.pth`` is, so missing files are errors here.
    """
    path = str(path)
    state = check_json_file(os.path.join(path, TRAINER_STATE_NAME))
    if "global_step" not in state:
        raise CorruptFileError(os.path.join(path, TRAINER_STATE_NAME), "has no 'global_step' entry")
    optimizer_files = [m for pattern in OPTIMIZER_PATTERNS for m in _matches(path, pattern)]
    if not optimizer_files:
        raise CorruptFileError(os.path.join(path, OPTIMIZER_NAME),
                               "file is missing: resuming would silently restart the optimizer")
    for found in optimizer_files:
        if os.path.isfile(found) and found.endswith((".pt", ".bin")):
            check_torch_file(found, deep=deep)
    if os.path.isfile(os.path.join(path, OPTIMIZER_NAME)):
        check_torch_file(os.path.join(path, SCHEDULER_NAME), deep=deep)
    rng_files = _matches(path, RNG_STATE_PATTERN)
    if not rng_files:
        raise CorruptFileError(os.path.join(path, "rng_state.pth"),
                               "file is missing: resuming would silently change the random streams")
    for found in rng_files:
        check_torch_file(found, deep=deep)


def verify_checkpoint(path: str, deep: bool = False) -> None:
    """Check a ``Trainer`` checkpoint folder (``checkpoint-N``) before ``resume_from_checkpoint``.

    Raises :class:`CorruptFileError` naming the first missing, truncated or unparsable file. ``deep=True``
    also verifies the checksums of the ``torch.save`` archives (reads them in full).
    """
    path = str(path)
    if not os.path.isdir(path):
        raise CorruptFileError(path, "checkpoint folder is missing")
    if os.path.isfile(os.path.join(path, ADAPTER_CONFIG_NAME)) or _has_adapter_weights(path):
        verify_adapter_folder(path)
    verify_trainer_files(path, deep=deep)


def _has_adapter_weights(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, name)) for name in (ADAPTER_SAFETENSORS_NAME, ADAPTER_BIN_NAME))


def is_trainer_checkpoint(path: str) -> bool:
    """Whether a folder holds Trainer state next to the adapter (a ``checkpoint-N`` folder)."""
    return any(os.path.exists(os.path.join(path, name)) for name in TRAINER_MARKERS) or bool(
        _matches(path, RNG_STATE_PATTERN))


def _adapter_key_belongs(key: str, prefix: str, adapter_name: str) -> bool:
    return prefix in key and (key.endswith(f".{adapter_name}") or f".{adapter_name}." in key)


def check_loaded_adapter_keys(model, tuner_cls, config, adapter_name: str, loaded: dict) -> None:
    """Refuse a weights file that lacks any of the method's tensors for ``adapter_name``.

    ``loaded`` is the state dict after PEFT's key remapping (model key names). Without this check the
    missing tensors (masks, gates, z, statistics, ...) keep their freshly initialised values.
    """
    last = _last_weights_file.get()
    _last_weights_file.set(None)
    source = last[0] if last is not None and last[1] == len(loaded) else None
    prefix = tuner_cls.prefix
    expected = [k for k in model.state_dict() if _adapter_key_belongs(k, prefix, adapter_name)]
    missing = [k for k in expected if k not in loaded]
    if missing:
        names = sorted(tuner_cls._remove_adapter_name_from_key(k, adapter_name) for k in missing)
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
        where = source if source is not None else "the state dict passed to set_peft_model_state_dict"
        raise CorruptFileError(
            where, f"lacks {len(names)} tensor(s) of {getattr(config.peft_type, 'value', config.peft_type)} "
                   f"adapter {adapter_name!r}: {shown}; "
                   "loading would leave them at their initial values")
    if source is not None and not getattr(config, "inference_mode", True):
        folder = os.path.dirname(source)
        if is_trainer_checkpoint(folder):
            verify_trainer_files(folder)


def _unreadable_file_errors() -> tuple[type[BaseException], ...]:
    """What safetensors and ``torch.load`` raise for a truncated or garbled file."""
    import pickle

    from safetensors import SafetensorError

    return SafetensorError, RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile


def _name_weights_file(loader):
    """Wrap PEFT's weights loader so that an unreadable file names itself, and remember the file."""

    @functools.wraps(loader)
    def load(filename, *args, **kwargs):
        try:
            result = loader(filename, *args, **kwargs)
        except (FileNotFoundError, MemoryError):
            raise
        except _unreadable_file_errors() as error:
            if "out of memory" in str(error).lower():
                raise
            raise CorruptFileError(filename, f"cannot be loaded (truncated or corrupted?): {error}") from error
        _last_weights_file.set((str(filename), len(result)))
        return result

    load._peft_lowrank_ext_wrapped = True
    return load


def _name_config_file(original):
    """Wrap ``PeftConfigMixin.from_json_file`` so that a truncated or garbled config names itself."""

    @functools.wraps(original)
    def from_json_file(cls, path_json_file, **kwargs):
        try:
            value = original(cls, path_json_file, **kwargs)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CorruptFileError(path_json_file, f"is not valid JSON (truncated or corrupted?): {error}") \
                from error
        if not isinstance(value, dict):
            raise CorruptFileError(path_json_file, f"must hold a JSON object, found {type(value).__name__}")
        _check_weights_next_to_config(path_json_file, value)
        return value

    from_json_file._peft_lowrank_ext_wrapped = True
    return from_json_file


def _check_weights_next_to_config(config_path: str, config: dict) -> None:
    """For this package's methods, check the weights file next to the config as soon as the config is read.

    transformers' ``load_adapter`` reads the weights with its own loader; checking here names the file there too.
    """
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    tuner = PEFT_TYPE_TO_TUNER_MAPPING.get(config.get("peft_type"))
    if tuner is None or not tuner.__module__.startswith(__name__.split(".", 1)[0] + "."):
        return
    folder = os.path.dirname(str(config_path))
    safetensors_path = os.path.join(folder, ADAPTER_SAFETENSORS_NAME)
    if os.path.isfile(safetensors_path):
        check_safetensors_file(safetensors_path)


def _refuse_local_folder_without_weights(load_peft_weights):
    """Wrap ``load_peft_weights``: a local adapter folder without weights names the missing file.

    PEFT otherwise treats the folder path as a Hub repository id and fails with an unrelated message.
    """

    @functools.wraps(load_peft_weights)
    def load(model_id, *args, **kwargs):
        subfolder = kwargs.get("subfolder")
        folder = os.path.join(str(model_id), subfolder) if subfolder else str(model_id)
        if os.path.isfile(os.path.join(folder, ADAPTER_CONFIG_NAME)) and not _has_adapter_weights(folder):
            raise CorruptFileError(os.path.join(folder, ADAPTER_SAFETENSORS_NAME),
                                   f"file is missing (and there is no {ADAPTER_BIN_NAME} either)")
        return load_peft_weights(model_id, *args, **kwargs)

    load._peft_lowrank_ext_wrapped = True
    return load


def install() -> None:
    """Make PEFT's loaders name unreadable or missing files (idempotent)."""
    from peft import peft_model
    from peft.config import PeftConfigMixin
    from peft.utils import save_and_load

    if not getattr(peft_model.load_peft_weights, "_peft_lowrank_ext_wrapped", False):
        peft_model.load_peft_weights = _refuse_local_folder_without_weights(peft_model.load_peft_weights)

    for name in ("safe_load_file", "torch_load"):
        loader = getattr(save_and_load, name)
        if not getattr(loader, "_peft_lowrank_ext_wrapped", False):
            setattr(save_and_load, name, _name_weights_file(loader))
    original = PeftConfigMixin.__dict__["from_json_file"].__func__
    if not getattr(original, "_peft_lowrank_ext_wrapped", False):
        PeftConfigMixin.from_json_file = classmethod(_name_config_file(original))
