"""The data only the user can give HeteroLoRA: fixed scoring batches and the alpha test's validation set.

The authors score ``grad_norm``/``snip``/``synflow`` on the first batches of the *unshuffled*
training set (the same batches at every allocation) and run the alpha test on a 1:1 mix of
training and validation examples (``dyrealloc_callback.py``). A training loop hands the model
only its current batch, so those sets come from one object, :class:`HeteroLoraData`:

* ``Trainer`` / ``SFTTrainer``: ``callbacks=[HeteroLoraData(validation=eval_set)]`` — the training
  set, collator, batch size and steps per epoch are taken from the trainer;
* plain loop: ``HeteroLoraData(train=..., validation=..., collate_fn=..., steps_per_epoch=...).attach(model)``.

Both ``train`` and ``validation`` are either ready batches (dicts of tensors, mixed batch by batch)
or datasets of examples batched with ``collate_fn`` (mixed example by example, as the authors).
"""

from __future__ import annotations

import itertools
from typing import Iterable, Optional

import torch
from torch import nn
from transformers import TrainerCallback

from .._base.tuner import adapted_root, unwrap_data_parallel
from .layer import HeteroLoraLayer

DATA_ATTR = "_heterolora_data"


def _is_batches(data, collate_fn) -> bool:
    if collate_fn is not None or hasattr(data, "column_names"):
        return False
    first = next(iter(data), None)
    return isinstance(first, dict) and all(torch.is_tensor(v) for v in first.values())


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


class HeteroLoraData(TrainerCallback):
    """Scoring data for HeteroLoRA (see the module docstring); every field is optional except where a
    proxy needs it: ``proxy="alpha_test"`` needs ``validation``."""

    def __init__(self, train: Optional[Iterable] = None, validation: Optional[Iterable] = None, batch_size: int = 8,
                 collate_fn=None, seed: int = 0, steps_per_epoch: Optional[int] = None):
        for name, value in (("train", train), ("validation", validation)):
            if value is not None and hasattr(value, "__len__") and len(value) == 0:
                raise ValueError(f"HeteroLoraData.{name} is empty, which is not allowed; give at least one example "
                                 "or None")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"HeteroLoraData.batch_size={batch_size!r} is not allowed; it must be an integer >= 1")
        if steps_per_epoch is not None and (not isinstance(steps_per_epoch, int) or steps_per_epoch < 1):
            raise ValueError(f"HeteroLoraData.steps_per_epoch={steps_per_epoch!r} is not allowed; it must be None "
                             "or an integer >= 1")
        self.train, self.validation = train, validation
        self.batch_size, self.collate_fn, self.seed = batch_size, collate_fn, seed
        self.steps_per_epoch = steps_per_epoch

    # ----- wiring -----------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> "HeteroLoraData":
        """Use this data for ``model``'s allocations; sets ``steps_per_epoch`` on configs that lack it."""
        root = adapted_root(unwrap_data_parallel(model))
        layers = [m for m in root.modules() if isinstance(m, HeteroLoraLayer)]
        if not layers:
            raise ValueError("HeteroLoraData.attach: the model has no HeteroLoRA layers (wrap it with "
                             "HeteroLoraConfig)")
        object.__setattr__(root, DATA_ATTR, self)
        from .allocation import attach_sharded_entry

        attach_sharded_entry(root, model)
        if self.steps_per_epoch is not None:
            for layer in layers:
                for config in layer._store("config").values():
                    if config.steps_per_epoch is None:
                        config.steps_per_epoch = self.steps_per_epoch
        return self

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if train_dataloader is not None:
            if self.train is None:
                self.train = train_dataloader.dataset
                self.batch_size = args.per_device_train_batch_size
            if self.collate_fn is None and not _is_batches(self.train, None):
                self.collate_fn = train_dataloader.collate_fn
            if self.steps_per_epoch is None:
                try:
                    self.steps_per_epoch = max(1, len(train_dataloader) // max(1, args.gradient_accumulation_steps))
                except TypeError:  # an iterable data set has no length: keep integer realloc_every
                    pass
        self.attach(model)

    # ----- batches ----------------------------------------------------------------------------
    def _loader(self, data, indices=None):
        if indices is not None:
            data = torch.utils.data.Subset(data, indices)
        if self.collate_fn is None:
            raise ValueError("HeteroLoraData.collate_fn=None is not allowed for a data set of examples outside a "
                             "Trainer; pass collate_fn, or pass ready batches")
        return torch.utils.data.DataLoader(data, batch_size=self.batch_size, shuffle=False,
                                           collate_fn=self.collate_fn)

    def scoring_batches(self, n: int, device) -> Optional[list[dict]]:
        """The first ``n`` batches of the unshuffled training data (None without training data)."""
        if self.train is None:
            return None
        source = self.train if _is_batches(self.train, self.collate_fn) else self._loader(self.train)
        return [_to(b, device) for b in itertools.islice(iter(source), n)]

    def mixed_batches(self, n: int, device, allocation_index: int) -> list[dict]:
        """The first ``n`` batches of the authors' 1:1 training/validation mix, reshuffled per allocation."""
        if self.validation is None:
            raise ValueError("HeteroLoRA proxy='alpha_test' (the authors' alpha test) needs validation data: pass "
                             "HeteroLoraData(validation=...) as a Trainer callback or .attach(model) it (or use "
                             "proxy='alpha_test_delta', which scores the training loss)")
        if self.train is None:
            raise ValueError("HeteroLoRA proxy='alpha_test' mixes training and validation data 1:1: give "
                             "HeteroLoraData(train=...) in a plain loop (a Trainer supplies its training set)")
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + allocation_index) % 2**63)
        if _is_batches(self.train, self.collate_fn):
            train, val = list(self.train), list(self.validation)
            order = _interleave(torch.randperm(len(train), generator=gen), torch.randperm(len(val), generator=gen))
            batches = [train[i] if i < len(train) else val[i - len(train)] for i in order]
            return [_to(b, device) for b in batches[:n]]
        offset = len(self.train)
        order = _interleave(torch.randperm(offset, generator=gen),
                            torch.randperm(len(self.validation), generator=gen))
        mix = torch.utils.data.ConcatDataset([self.train, self.validation])
        return [_to(b, device) for b in itertools.islice(iter(self._loader(mix, order)), n)]


def _interleave(train_idx: torch.Tensor, val_idx: torch.Tensor) -> list[int]:
    """t0, v0, t1, v1, ... over min(len) pairs, then the rest of the validation set (as the authors);
    validation indices are offset by the training size."""
    val_idx = val_idx + len(train_idx)
    m = min(len(train_idx), len(val_idx))
    pairs = torch.stack([train_idx[:m], val_idx[:m]], dim=1).reshape(-1)
    return torch.cat([pairs, val_idx[m:]]).tolist()


def attached(root: nn.Module) -> Optional[HeteroLoraData]:
    return root.__dict__.get(DATA_ATTR)


def next_due(config, step: int) -> int:
    """The step before which the next allocation runs (authors' timing): the next multiple of
    ``realloc_every`` within the epoch, or the first step of the next epoch; -1 in static mode."""
    from .config import realloc_steps

    if config.mode != "dynamic":
        return -1
    every = realloc_steps(config)
    epoch = config.steps_per_epoch
    if epoch is None:
        return step + every
    start, offset = step - step % epoch, step % epoch
    nxt = (offset // every + 1) * every
    return start + nxt if nxt < epoch else start + epoch

