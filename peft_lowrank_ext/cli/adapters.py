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
    from peft_lowrank_ext.cli.adapter_info import _read_config  # the checks of `inspect`: JSON object, peft_type

    try:
        return _read_config(Path(adapter_dir))
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"argument ADAPTER_DIR: {_first_line(e)}") from None


def check_adapter_folder(adapter_dir: str | os.PathLike):
    """What ``inspect`` reads (config and weights file) or one ``argument ADAPTER_DIR`` error line."""
    from peft_lowrank_ext.cli.adapter_info import describe_adapter

    try:
        return describe_adapter(adapter_dir)
    except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
        reason = _first_line(e)
        if str(adapter_dir) not in reason:  # e.g. int('abc') of a config field, a missing buffer: say where
            missing = "missing key " if isinstance(e, KeyError) else ""
            reason = f"cannot read the adapter in {str(adapter_dir)!r}: {missing}{reason}"
        raise ValueError(f"argument ADAPTER_DIR: {reason}") from None


def check_peft_config(adapter_dir: str | os.PathLike) -> None:
    """PEFT itself accepts the config (known peft_type, fields of the right types), or one error line."""
    import peft_lowrank_ext  # noqa: F401  (registers the methods with PEFT)
    from peft import PeftConfig

    try:
        PeftConfig.from_pretrained(str(adapter_dir))
    except Exception as e:  # KeyError for an unknown peft_type, ValueError/TypeError for bad fields
        reason = f"unknown peft_type {e}" if isinstance(e, KeyError) else _first_line(e)
        raise ValueError(f"argument ADAPTER_DIR: {Path(adapter_dir) / ADAPTER_CONFIG} is not a config PEFT can "
                         f"load: {reason}") from None


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
    if not base or not isinstance(base, str):
        raise ValueError("argument --model: the adapter does not record its base model "
                         f"(base_model_name_or_path={base!r}); pass --model PATH_OR_HUB_ID")
    task = config.get("task_type")
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    from peft_lowrank_ext.train.hub import fail_fast_offline

    fail_fast_offline(base)  # no Hub: fail at once instead of after a minute of retries

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


def check_output_dir(adapter_dir: str | os.PathLike, output_dir: str | os.PathLike) -> None:
    """OUTPUT_DIR must be a folder (new or existing) other than ADAPTER_DIR."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"argument OUTPUT_DIR: {str(output_dir)!r} is a file; pass a folder (new or existing)")
    if out.exists() and out.resolve() == Path(adapter_dir).resolve():
        raise ValueError(f"argument OUTPUT_DIR: {str(output_dir)!r} is ADAPTER_DIR itself; pass another folder "
                         "(the export would overwrite the adapter)")


def export_adapter(adapter_dir: str | os.PathLike, output_dir: str | os.PathLike, model: str | None = None,
                   layout: str = "uniform", head: str = "keep"):
    """Write ``adapter_dir`` as an exact plain PEFT LoRA adapter to ``output_dir``; return its LoraConfig.

    ``layout`` and ``head`` as in :func:`peft_lowrank_ext.export_lora` (``--layout``, ``--head``)."""
    from peft_lowrank_ext import export_lora

    config = read_adapter_config(adapter_dir)
    method = str(config.get("peft_type", "?")).lower()
    if method == "lora":
        raise CliError(f"export: {str(adapter_dir)!r} is already a plain PEFT LoRA adapter; it loads without this "
                       "package, there is nothing to export")
    check_output_dir(adapter_dir, output_dir)
    check_peft_config(adapter_dir)  # fields PEFT accepts, and a readable weights file, before the base model loads
    check_adapter_folder(adapter_dir)
    peft_model = load_adapter_model(adapter_dir, model)
    try:
        return export_lora(peft_model, output_dir, layout=layout, head=head)
    except ValueError as e:
        raise CliError(f"export: the {method} adapter {str(adapter_dir)!r} cannot be exported to plain LoRA: "
                       f"{_first_line(e)}") from None


def inspect_adapter(adapter_dir: str | os.PathLike, as_json: bool = False) -> str:
    """The text (or JSON) that ``inspect`` prints."""
    from peft_lowrank_ext.cli.adapter_info import format_adapter_info

    info = check_adapter_folder(adapter_dir)
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
