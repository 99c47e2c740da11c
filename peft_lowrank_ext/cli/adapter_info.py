"""What a saved adapter folder holds, read from ``adapter_config.json`` and the weights file only.

This is what ``inspect ADAPTER_DIR`` prints. The base model is never loaded (it may be large or
not at hand): ranks, sizes and exportability are worked out from the config, the tensor shapes and
the few small buffers (rank masks, module switches, AutoLoRA's β) stored with the adapter.
``exportable`` follows the rules of :func:`peft_lowrank_ext.export_lora` exactly.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

from ..tuners.autolora.layer import kept_mask
from ..tuners.heterolora.shortcuts import SHORTCUT_ATTR

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

OWN_METHODS = ("rlora", "autolora", "prilora", "heterolora")
GATED_METHODS = ("autolora", "prilora", "heterolora")
# Buffers needed to tell the effective ranks (everything else is read as shapes only).
RANK_BUFFERS = ("rank_mask", "module_on", "beta", "element_mask")
SHORTCUT_KINDS = {attr: kind for kind, attr in SHORTCUT_ATTR.items()}


@dataclass
class AdapterInfo:
    """A saved adapter at a glance; ``modules`` maps each adapted module to its rank facts.

    Per module: ``rank`` (LoRA; gated methods: ranks whose gate is on, 0 if switched off, with
    ``max_rank``, ``on`` and for PRILoRA ``sparsity`` of A) or, for RLoRA, ``r`` and
    ``intrinsic_dim``; ``parameters``: its trainable values. ``num_parameters`` counts the
    trainable values stored in the file: the adapter's own parameters plus ``other_parameters``
    (``modules_to_save`` copies, trainable tokens); buffers (masks, gates, β, statistics) are not
    counted. ``file_bytes`` is the size of the weights file.
    """

    path: str
    method: str
    peft_type: str
    base_model: str | None
    task_type: str | None
    modules: dict[str, dict] = field(default_factory=dict)
    num_parameters: int = 0
    file_bytes: int = 0
    exportable: bool = False
    export_note: str = ""
    weights_file: str = ""
    other_parameters: int = 0

    def ranks(self) -> dict[str, int]:
        """``{module: rank}`` (RLoRA: ``r``), comparable with :func:`peft_lowrank_ext.train.ranks.module_ranks`."""
        out = {}
        for name, facts in self.modules.items():
            rank = facts.get("rank", facts.get("r"))
            if rank is not None:
                out[name] = int(rank)
        return out

    def to_dict(self) -> dict:
        return asdict(self)


# ----- reading the folder ---------------------------------------------------------------------------
def _read_config(folder: Path) -> dict:
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: {folder} is not a saved PEFT adapter "
                                f"(save_pretrained writes {CONFIG_NAME} next to the weights)")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_file} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} holds a {type(config).__name__}, not a JSON object of config fields")
    if not isinstance(config.get("peft_type"), str) or not config["peft_type"]:
        raise ValueError(f"{config_file}: field peft_type={config.get('peft_type')!r} is missing or not a string; "
                         "it must name the PEFT method (e.g. 'LORA', 'RLORA')")
    return config


def _read_weights(folder: Path) -> tuple[Path, dict[str, tuple[int, ...]], dict[str, torch.Tensor]]:
    """(file, {key: shape}, {key: tensor} of the rank buffers) of the weights file."""
    safetensors_file, bin_file = folder / SAFETENSORS_NAME, folder / BIN_NAME
    if safetensors_file.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(safetensors_file), framework="pt") as handle:
                keys = list(handle.keys())
                shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in keys}
                buffers = {key: handle.get_tensor(key) for key in keys if _kind_of(key) in RANK_BUFFERS}
        except Exception as err:  # safetensors raises its own error type for truncated/corrupt files
            raise ValueError(f"{safetensors_file} is not a readable safetensors file (truncated or corrupt?): "
                             f"{err}") from None
        return safetensors_file, shapes, buffers
    if bin_file.is_file():
        try:
            state = torch.load(bin_file, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"{bin_file} is not a readable PyTorch state dict (truncated or corrupt?): {err}") from None
        if not isinstance(state, dict):
            raise ValueError(f"{bin_file} holds a {type(state).__name__}, not a state dict")
        shapes = {key: tuple(value.shape) for key, value in state.items()}
        buffers = {key: value for key, value in state.items() if _kind_of(key) in RANK_BUFFERS}
        return bin_file, shapes, buffers
    raise FileNotFoundError(f"{safetensors_file} not found (nor {BIN_NAME}): the adapter's weights are missing")


def _kind_of(key: str) -> str:
    """``rank_mask`` of ``...c_attn.prilr_rank_mask`` (the tensor kind after the method's prefix)."""
    last = key.rsplit(".", 1)[-1]
    return last.split("_", 1)[1] if "_" in last else last


# ----- interpreting the tensors ---------------------------------------------------------------------
def _method_tables(peft_type: str) -> tuple[str | None, tuple[str, ...] | None]:
    """(tensor-name prefix, names of the trainable per-adapter tensors) of a PEFT type, if PEFT knows it."""
    from peft.utils import PeftType

    try:
        member = PeftType(peft_type)
    except ValueError:
        return None, None
    prefix = PEFT_TYPE_TO_PREFIX_MAPPING.get(member)
    tuner = PEFT_TYPE_TO_TUNER_MAPPING.get(member)
    layer_cls = getattr(tuner, "tuner_layer_cls", None)
    return prefix, tuple(getattr(layer_cls, "adapter_layer_names", ())) or None


def _split_key(key: str, prefix: str | None) -> tuple[str | None, str]:
    """(module name, tensor segment) of an adapter key; module None for keys outside adapter layers."""
    segments = key.removeprefix(PEFT_PREFIX).split(".")
    if prefix:
        for i, segment in enumerate(segments):
            if segment.startswith(prefix) and i > 0:
                return ".".join(segments[:i]), segment
    return None, key


def _natural_order(name: str) -> list:
    """Sort key that puts ``h.2`` before ``h.10`` (the weights file lists keys alphabetically)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split(".")]


def _numel(shape: tuple[int, ...]) -> int:
    return int(math.prod(shape))


def _gated_module_facts(method: str, prefix: str, module: str, config: dict, buffers) -> dict:
    key = f"{PEFT_PREFIX}{module}.{prefix}"
    if key + "rank_mask" not in buffers:
        key = f"{module}.{prefix}"  # saved without PEFT's wrapper prefix (transformers' integration)
    rank_mask = buffers[key + "rank_mask"].float()
    module_on = buffers.get(key + "module_on")
    on = module_on is None or bool(module_on != 0)
    rank = int(torch.count_nonzero(rank_mask)) if on else 0
    facts = {"rank": rank, "max_rank": int(rank_mask.numel()), "on": on}
    if method == "autolora" and config.get("phase", "search") == "search" and rank:
        rank = _autolora_kept(buffers[key + "beta"].float(), config, int(rank_mask.numel()), module)
        facts["rank"] = rank
        facts["active_ranks"] = int(torch.count_nonzero(rank_mask))
    if key + "element_mask" in buffers:
        facts["sparsity"] = round(1.0 - float(buffers[key + "element_mask"].float().mean()), 4)
    kind = SHORTCUT_KINDS.get(module.rsplit(".", 1)[-1])
    if kind is not None:
        facts["shortcut"] = kind
    return facts


def _autolora_kept(beta: torch.Tensor, config: dict, r: int, module: str) -> int:
    """What ``autolora_select`` would keep: ``#{j : score_j ≥ threshold}`` by the config's selection rule, at least 1."""
    threshold = config.get("threshold") or 1.0 / r
    rule = config.get("selection_rule", "softmax")
    return int(kept_mask(beta, threshold, rule, f"module {module!r}").sum())


def _module_facts(method: str, prefix: str, config: dict, per_module: dict[str, dict[str, tuple]], buffers) -> dict:
    facts = {}
    for module, tensors in per_module.items():
        if method in GATED_METHODS:
            facts[module] = _gated_module_facts(method, prefix, module, config, buffers)
        elif method == "rlora":
            facts[module] = {"r": int(config.get("r", 0)), "intrinsic_dim": _numel(tensors[prefix + "z"])}
        else:
            rank_source = tensors.get(prefix + "A") or tensors.get(prefix + "embedding_A")
            facts[module] = {"rank": int(rank_source[0])} if rank_source else {}
    return facts


def _export_verdict(method: str, config: dict, modules: dict[str, dict]) -> tuple[bool, str]:
    """Whether ``export_lora`` succeeds for this adapter, and why (mirrors ``export.py``)."""
    if method == "lora":
        return False, ("already a plain PEFT LoRA adapter: it loads without this package "
                       "(export_lora converts only this package's methods)")
    if method not in OWN_METHODS:
        return False, "export_lora converts only RLoRA, AutoLoRA, PRILoRA and HeteroLoRA adapters"
    if method == "rlora":
        return True, ("export_lora writes the A, B regenerated from z and the seeded projection: "
                      "an exact plain LoRA adapter")
    shortcuts_on = [name for name, facts in modules.items() if "shortcut" in facts and facts["on"]]
    if shortcuts_on:
        return False, (f"{len(shortcuts_on)} HeteroLoRA shortcut(s) switched on (e.g. {shortcuts_on[0]}): a shortcut "
                       "has no base weight, so no LoRA adapter can hold it; keep the PEFT model")
    kept = [name for name, facts in modules.items() if facts.get("active_ranks", facts["rank"]) > 0]
    if not kept:
        return False, "every module is switched off: there is nothing to export"
    left_out = len(modules) - len(kept)
    tail = f"; {left_out} module(s) with rank 0 are left out" if left_out else ""
    if method == "autolora" and config.get("phase", "search") == "search":
        return True, ("search phase: export_lora would write all r components weighted by α, not only the ranks "
                      "shown (what autolora_select keeps); call autolora_select before exporting" + tail)
    if method == "prilora":
        return True, "export_lora writes the kept ranks with pruned entries of A as zeros (exact)" + tail
    if method == "heterolora":
        return True, f"export_lora writes the {len(kept)} switched-on LoRA module(s) (exact)" + tail
    return True, "export_lora writes the selected components (exact)" + tail


def describe_adapter(path: str | os.PathLike) -> AdapterInfo:
    """Read a saved adapter folder (no base model); raise ``FileNotFoundError``/``ValueError`` naming the file."""
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"adapter folder {folder} does not exist")
    if not folder.is_dir():
        raise ValueError(f"path={str(folder)!r} is a file; pass the adapter folder that holds {CONFIG_NAME}")
    config = _read_config(folder)
    weights_file, shapes, buffers = _read_weights(folder)

    peft_type = config["peft_type"]
    method = peft_type.lower()
    prefix, trainable_names = _method_tables(peft_type)
    per_module: dict[str, dict[str, tuple]] = {}
    adapter_params: dict[str, int] = {}
    other_parameters = 0
    for key, shape in shapes.items():
        module, segment = _split_key(key, prefix)
        if module is None:  # modules_to_save copies, trainable tokens: trained values as well
            other_parameters += _numel(shape)
            continue
        per_module.setdefault(module, {})[segment] = shape
        if trainable_names is None or segment in trainable_names:
            adapter_params[module] = adapter_params.get(module, 0) + _numel(shape)

    per_module = {name: per_module[name] for name in sorted(per_module, key=_natural_order)}
    modules = _module_facts(method, prefix or "", config, per_module, buffers)
    for module, facts in modules.items():
        facts["parameters"] = adapter_params.get(module, 0)
    exportable, note = _export_verdict(method, config, modules)
    return AdapterInfo(
        path=str(folder),
        method=method,
        peft_type=peft_type,
        base_model=config.get("base_model_name_or_path"),
        task_type=config.get("task_type"),
        modules=modules,
        num_parameters=sum(adapter_params.values()) + other_parameters,
        file_bytes=weights_file.stat().st_size,
        exportable=exportable,
        export_note=note,
        weights_file=weights_file.name,
        other_parameters=other_parameters,
    )


# ----- text -----------------------------------------------------------------------------------------
def _size(num_bytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return ""


def _module_line(facts: dict) -> str:
    if "intrinsic_dim" in facts:
        text = f"r {facts['r']}, intrinsic_dim {facts['intrinsic_dim']}"
    elif "max_rank" in facts:
        text = f"rank {facts['rank']}/{facts['max_rank']}"
        if not facts["on"]:
            text += " (off)"
        if "sparsity" in facts:
            text += f", sparsity {facts['sparsity']:.2f}"
        if "shortcut" in facts:
            text += f", shortcut {facts['shortcut']}"
    elif "rank" in facts:
        text = f"rank {facts['rank']}"
    else:
        text = ""
    return f"{text}, {facts['parameters']:,} params" if text else f"{facts['parameters']:,} params"


def format_adapter_info(info: AdapterInfo) -> str:
    """Human-readable summary of :func:`describe_adapter`'s result, one fact per line."""
    ranks = info.ranks()
    lines = [
        f"adapter:      {info.path}",
        f"method:       {info.method} (peft_type {info.peft_type})",
        f"base model:   {info.base_model or 'not recorded'}",
        f"task:         {info.task_type or 'not recorded'}",
        f"modules:      {len(info.modules)}" + (f" (total rank {sum(ranks.values())})" if ranks else ""),
    ]
    width = max((len(name) for name in info.modules), default=0)
    for name, facts in info.modules.items():
        lines.append(f"  {name.ljust(width)}  {_module_line(facts)}")
    params = f"{info.num_parameters:,}"
    if info.other_parameters:
        params += f" ({info.num_parameters - info.other_parameters:,} adapter + {info.other_parameters:,} other)"
    lines += [
        f"parameters:   {params} trainable values stored",
        f"file:         {info.weights_file}, {_size(info.file_bytes)} ({info.file_bytes:,} bytes)",
        f"exportable:   {'yes' if info.exportable else 'no'} (to plain LoRA with export_lora) - {info.export_note}",
    ]
    return "\n".join(lines)
