"""From the search phase to ranks: thresholding α, the retrain LoRA config, and the one-call pipeline."""

from __future__ import annotations

import re

from peft import LoraConfig
from torch import nn

from .layer import AutoLoraLayer
from .._base.tuner import adapter_layers
from .search import AutoLoraSearch


def _layers(model: nn.Module, adapter_name: str | None):
    return adapter_layers(model, AutoLoraLayer, adapter_name, "AutoLoRA")


def autolora_ranks(model: nn.Module, adapter_name: str | None = None, threshold: float | None = None) -> dict[str, int]:
    """Per-module ranks: #{j : score_j ≥ threshold} (default the config's, i.e. 1/r), at least 1; the score is
    softmax(β)_j or β_j / Σβ by the config's ``selection_rule``."""
    ranks = {}
    for name, module, adapter in _layers(model, adapter_name):
        config = module._store("config")[adapter]
        if config.phase == "selected" and threshold is None:
            ranks[name] = int(module._store("rank_mask")[adapter].sum())
        else:
            ranks[name] = int(module.kept_components(adapter, threshold or config.effective_threshold, name).sum())
    return ranks


def autolora_select(model: nn.Module, adapter_name: str | None = None, threshold: float | None = None) -> dict[str, int]:
    """End the search: mask the dropped components (gate = α ⊙ kept), freeze β; return the ranks."""
    if threshold is not None and not (0 < threshold <= 1):
        raise ValueError(f"threshold={threshold!r} is not allowed; it must be in (0, 1]")
    ranks, masks = {}, []
    for name, module, adapter in _layers(model, adapter_name):
        config = module._store("config")[adapter]
        keep = module.kept_components(adapter, threshold or config.effective_threshold, name)
        masks.append((module, adapter, keep))
        ranks[name] = int(keep.sum())
    for module, adapter, keep in masks:  # only once every module could be thresholded (normalized: Σβ > 0)
        config = module._store("config")[adapter]
        module._store("rank_mask")[adapter].copy_(keep)
        config.phase = "selected"
    return ranks


def retrain_lora_config(model: nn.Module, adapter_name: str | None = None, **overrides) -> LoraConfig:
    """The ``LoraConfig`` of the retrain phase: the selected ranks, scaling ``lora_alpha / r_module``."""
    ranks = autolora_ranks(model, adapter_name)
    _, module, adapter = _layers(model, adapter_name)[0]
    config = module._store("config")[adapter]
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    kwargs = dict(
        r=common,
        lora_alpha=config.lora_alpha,
        target_modules=sorted(ranks),
        rank_pattern={re.escape(k): v for k, v in ranks.items() if v != common},
        lora_dropout=config.retrain_dropout,
        fan_in_fan_out=config.fan_in_fan_out,
        modules_to_save=config.modules_to_save,
        task_type=config.task_type,
    )
    kwargs.update(overrides)
    return LoraConfig(**kwargs)


def freeze_modules_to_save(model: nn.Module) -> int:
    """Freeze the copies PEFT trains beside the adapter (e.g. a classification head); returns how many tensors.

    The authors' search optimises only the ``lora_`` parameters: the head stays as initialised.
    """
    frozen = 0
    for name, param in model.named_parameters():
        if param.requires_grad and "modules_to_save" in name:
            param.requires_grad_(False)
            frozen += 1
    return frozen


def run_autolora(model_init, config, train_dataset, training_args, data_collator=None, held_out_dataset=None,
                 retrain_args=None, processing_class=None, search_trains_head: bool = False):
    """Search → select → retrain in one call with HF ``Trainer``.

    ``model_init()`` returns a fresh base model (called twice). Without ``held_out_dataset`` the
    training set is split ``1 − held_out_fraction`` / ``held_out_fraction`` (authors: 70/30) for
    the search; the retrain uses the whole training set. As in the authors' search, only the adapter
    trains in the search (``modules_to_save`` such as the head stay as initialised) unless
    ``search_trains_head``. Returns ``(lora_model, ranks)``.
    """
    from peft import get_peft_model
    from transformers import Trainer

    if held_out_dataset is None:
        split = train_dataset.train_test_split(test_size=config.held_out_fraction, seed=training_args.seed)
        search_train, held_out = split["train"], split["test"]
    else:
        search_train, held_out = train_dataset, held_out_dataset
    if len(held_out) == 0:
        raise ValueError("run_autolora: the held-out set is empty, which is not allowed")
    search_model = get_peft_model(model_init(), config)
    if not search_trains_head:
        freeze_modules_to_save(search_model)
    search = AutoLoraSearch(held_out, batch_size=training_args.per_device_train_batch_size, collate_fn=data_collator)
    Trainer(model=search_model, args=training_args, train_dataset=search_train, data_collator=data_collator,
            processing_class=processing_class, callbacks=[search]).train()
    ranks = autolora_select(search_model)
    lora_model = get_peft_model(model_init(), retrain_lora_config(search_model))
    Trainer(model=lora_model, args=retrain_args or training_args, train_dataset=train_dataset,
            data_collator=data_collator, processing_class=processing_class).train()
    return lora_model, ranks
