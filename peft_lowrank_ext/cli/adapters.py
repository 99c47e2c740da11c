"""Saved adapters on the command line: ``export`` to plain LoRA, ``inspect``, and ``--push-to-hub``.

Failures that are not a bad argument (an adapter that cannot be exported, no network for the hub)
raise :class:`CliError`; the CLI prints its one line and exits with status 1, without a traceback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"
HEAD_SUFFIXES = ("classifier.weight", "score.weight", "classifier.out_proj.weight")


class CliError(Exception):
    """A run failed for a reason other than a bad argument; the message is the whole report."""


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not Path(adapter_dir).is_dir():
        raise ValueError(f"argument ADAPTER_DIR: {str(adapter_dir)!r} is not a folder; pass a saved adapter folder")
    if not path.is_file():
        raise ValueError(f"argument ADAPTER_DIR: no {ADAPTER_CONFIG} in {str(adapter_dir)!r}; pass a saved adapter folder")
    return json.loads(path.read_text(encoding="utf-8"))


def _num_labels(adapter_dir: Path) -> int | None:
    """Classes of a saved classification head (PEFT stores it with ``task_type=SEQ_CLS``)."""
    from safetensors import safe_open

    file = adapter_dir / "adapter_model.safetensors"
    if not file.is_file():
        return None
    with safe_open(str(file), "pt") as f:
        for key in f.keys():
            if key.endswith(HEAD_SUFFIXES):
                return int(f.get_slice(key).get_shape()[0])
    return None


def load_adapter_model(adapter_dir: str | os.PathLike, model: str | None = None):
    """The base model (``model`` or the one the adapter names) with the adapter loaded, for export."""
    import peft_lowrank_ext  # noqa: F401  (registers the methods with PEFT)
    from peft import PeftModel

    from peft_lowrank_ext.train.models import model_load_error, quiet_transformers

    config = read_adapter_config(adapter_dir)
    base = model or config.get("base_model_name_or_path")
    if not base:
        raise ValueError("argument --model: the adapter does not record its base model; pass --model PATH_OR_HUB_ID")
    task = config.get("task_type")
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        with quiet_transformers():
            if task == "SEQ_CLS":
                labels = _num_labels(Path(adapter_dir))
                kwargs = {"num_labels": labels} if labels else {}
                net = AutoModelForSequenceClassification.from_pretrained(base, **kwargs)
            elif task == "CAUSAL_LM":
                net = AutoModelForCausalLM.from_pretrained(base)
            else:
                net = AutoModel.from_pretrained(base)
    except (OSError, ValueError, KeyError) as e:
        raise model_load_error(str(base), "the adapter's base model", e) from None
    try:
        return PeftModel.from_pretrained(net, str(adapter_dir))
    except Exception as e:  # mismatched base model, corrupt file, unknown method
        raise CliError(f"export: cannot load the adapter {str(adapter_dir)!r} onto {base!r}: {_first_line(e)}") from None


def export_adapter(adapter_dir: str | os.PathLike, output_dir: str | os.PathLike, model: str | None = None):
    """Write ``adapter_dir`` as an exact plain PEFT LoRA adapter to ``output_dir``; return its LoraConfig."""
    from peft_lowrank_ext import export_lora

    config = read_adapter_config(adapter_dir)
    method = str(config.get("peft_type", "?")).lower()
    if method == "lora":
        raise CliError(f"export: {str(adapter_dir)!r} is already a plain PEFT LoRA adapter; it loads without this "
                       "package, there is nothing to export")
    peft_model = load_adapter_model(adapter_dir, model)
    try:
        return export_lora(peft_model, output_dir)
    except ValueError as e:
        raise CliError(f"export: the {method} adapter {str(adapter_dir)!r} cannot be exported to plain LoRA: "
                       f"{_first_line(e)}") from None


def inspect_adapter(adapter_dir: str | os.PathLike, as_json: bool = False) -> str:
    """The text (or JSON) that ``inspect`` prints."""
    from peft_lowrank_ext.cli.adapter_info import describe_adapter, format_adapter_info

    try:
        info = describe_adapter(adapter_dir)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise ValueError(f"argument ADAPTER_DIR: {_first_line(e)}") from None
    return json.dumps(info.to_dict(), indent=2, default=str) if as_json else format_adapter_info(info)


def push_adapter(peft_model, repo_id: str, local_dir: str | None) -> str:
    """PEFT's ``push_to_hub``; any failure (offline, no token, no access) becomes one :class:`CliError` line."""
    try:
        info = peft_model.push_to_hub(repo_id)
    except Exception as e:  # network, authentication, offline mode: many exception types
        import huggingface_hub.constants as hub

        reason = ("the Hugging Face Hub cannot be reached (HF_HUB_OFFLINE is set or there is no network)"
                  if hub.HF_HUB_OFFLINE or isinstance(e, ConnectionError) else _first_line(e))
        saved = f"; the adapter is saved locally in {local_dir}" if local_dir else ""
        raise CliError(f"push-to-hub (--push-to-hub {repo_id}): upload failed: {reason}{saved}") from None
    return str(getattr(info, "commit_url", None) or repo_id)
