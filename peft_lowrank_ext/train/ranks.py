"""Effective per-module ranks of an adapted model, their layer × type grid, and their history in training.

One view for every method, so figures and ``inspect`` can compare them: plain PEFT LoRA and RLoRA
have a fixed rank per module; the gated methods (AutoLoRA, PRILoRA, HeteroLoRA) switch ranks and
whole modules on and off during training, which is what the history records.
"""

from __future__ import annotations

import math
import re
import weakref

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..tuners._base.layer import AdditiveAdapterLayer
from ..tuners._base.tuner import adapted_root
from ..tuners.prilora.depth import DEFAULT_BLOCK_PATTERN
from ..runtime.step_hooks import register_step_callbacks, unregister_step_callbacks

PEFT_PREFIX = "base_model.model."
# Column of ``rank_grid`` for modules outside the stack of blocks (e.g. a classifier head).
NO_BLOCK = -1

_BLOCK = re.compile(DEFAULT_BLOCK_PATTERN)


def _plain_rank(layer: nn.Module, adapter_name: str) -> int | None:
    """The rank of a layer that keeps a per-adapter ``r`` dict (PEFT LoRA and look-alikes)."""
    ranks = getattr(layer, "r", None)
    if isinstance(ranks, dict) and isinstance(ranks.get(adapter_name), int):
        return ranks[adapter_name]
    return None


def module_ranks(model: nn.Module, adapter_name: str = "default") -> dict[str, int]:
    """``{module name: effective rank}`` of every module adapted by ``adapter_name``, in model order.

    Names are relative to the transformers model (no ``base_model.model.`` prefix), as in a
    ``LoraConfig``. Each of this package's layers answers for itself
    (``AdditiveAdapterLayer.effective_rank``): RLoRA → ``r`` (the rank of the generated
    factors; the trainable size is the intrinsic dimension); AutoLoRA/PRILoRA/HeteroLoRA → the
    ranks whose gate is on (``rank_mask``), 0 for a module HeteroLoRA switched off (shortcuts
    included, named e.g. ``transformer.h.1.hetero_residual_1``). AutoLoRA *during the search*
    reports what thresholding would keep now (as :func:`autolora_ranks`: ``#{j : α_j ≥ threshold}``,
    at least 1) rather than the ``r`` components that are all still active, so the figures show
    where the search is heading; after ``autolora_select`` it is the selected ranks. PEFT LoRA
    (and look-alikes keeping a per-adapter ``r`` dict) → its ``r``.
    """
    root = adapted_root(model)
    ranks: dict[str, int] = {}
    for name, layer in root.named_modules():
        if isinstance(layer, AdditiveAdapterLayer):
            if layer.has_adapter(adapter_name):
                ranks[name] = layer.effective_rank(adapter_name)
        elif isinstance(layer, BaseTunerLayer):
            rank = _plain_rank(layer, adapter_name)
            if rank is not None:
                ranks[name] = rank
    if not ranks:
        raise ValueError(f"adapter_name={adapter_name!r}: the model has no module adapted by this adapter; "
                         f"pass the name of one of its adapters (e.g. {_adapter_names(model)})")
    return ranks


def _adapter_names(model: nn.Module) -> list[str]:
    config = getattr(model, "peft_config", None)
    return sorted(config) if isinstance(config, dict) else ["default"]


def layer_and_type(module_name: str) -> tuple[int | None, str]:
    """``(block index, module type)`` of a module name; ``(None, name)`` outside the stack of blocks.

    The block index is found as in PRILoRA (``prilora/depth.py``: GPT-2 ``transformer.h.N``,
    Llama ``model.layers.N``, BERT ``encoder.layer.N``, OPT, T5, ...). The type is the rest of the
    name after ``<list>.N.``, which is unique within one architecture and keeps the sub-block:
    ``attn.c_attn``, ``self_attn.q_proj``, ``attention.self.query``, ``hetero_residual_1``.
    """
    name = module_name.removeprefix(PEFT_PREFIX)
    match = _BLOCK.search(name)
    if match is None:
        return None, name
    rest = name[match.end(1):].lstrip(".")
    return int(match.group(1)), rest or name[: match.start(1)].rstrip(".")


def _stack_qualified_type(module_name: str) -> str:
    """The type with the stack's own name (``encoder.block`` / ``decoder.block``), for models with two stacks."""
    name = module_name.removeprefix(PEFT_PREFIX)
    match = _BLOCK.search(name)
    if match is None:
        return name
    return f"{name[: match.start(1)].rstrip('.')}.{name[match.end(1):].lstrip('.')}"


def rank_grid(ranks: dict[str, int]) -> tuple[list[int], list[str], list[list[float]]]:
    """``(layers, module_types, grid)`` with ``grid[type][layer]`` the rank, NaN where no module sits.

    Layers are sorted; modules outside the stack of blocks go to layer ``NO_BLOCK`` (-1) with their
    full name as type. Types keep the order of first appearance. If two modules would share a cell
    (encoder-decoder models: one index per stack), the types are qualified with the stack's name.
    """
    if not ranks:
        raise ValueError("ranks is empty; pass {module name: rank} with at least one module (see module_ranks)")
    parsed = {name: layer_and_type(name) for name, _ in ranks.items()}
    cells = [(layer, kind) for layer, kind in parsed.values()]
    if len(set(cells)) < len(cells):
        parsed = {name: (layer, _stack_qualified_type(name)) for name, (layer, _) in parsed.items()}
        cells = [(layer, kind) for layer, kind in parsed.values()]
        if len(set(cells)) < len(cells):
            parsed = {name: (layer, name) for name, (layer, _) in parsed.items()}
    layers = sorted({NO_BLOCK if layer is None else layer for layer, _ in parsed.values()})
    types = list(dict.fromkeys(kind for _, kind in parsed.values()))
    column = {layer: i for i, layer in enumerate(layers)}
    row = {kind: i for i, kind in enumerate(types)}
    grid = [[math.nan] * len(layers) for _ in types]
    for name, (layer, kind) in parsed.items():
        grid[row[kind]][column[NO_BLOCK if layer is None else layer]] = float(ranks[name])
    return layers, types, grid


METRICS = ("rank", "sparsity")


def _measure(model: nn.Module, adapter_name: str, metric: str) -> dict:
    if metric == "rank":
        return module_ranks(model, adapter_name)
    from ..tuners.prilora import prilora_sparsity

    return prilora_sparsity(model, adapter_name)


class RankHistory:
    """Snapshots ``(optimizer step, module_ranks)`` taken after every ``every``-th optimizer step.

    ``metric="sparsity"`` records ``prilora_sparsity`` (fraction of A's entries pruned, per module) instead:
    PRILoRA prunes entries, not ranks, so its ranks stay flat while its sparsity moves.

    Hangs on the package's global optimizer-step hooks (``runtime/step_hooks.py``), so it records by itself
    in a plain loop, HF ``Trainer`` and TRL ``SFTTrainer``; it runs after the methods' own
    post-step work (pruning, re-allocation), so a snapshot shows the ranks the next step uses.
    Steps are counted from ``attach()`` (1 = the first optimizer step seen).
    """

    def __init__(self, model: nn.Module, every: int = 1, adapter_name: str = "default", metric: str = "rank") -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every={every!r} is not allowed; it must be an integer >= 1 (record every n-th step)")
        if metric not in METRICS:
            raise ValueError(f"metric={metric!r} is not allowed; choose one of {list(METRICS)} "
                             "('sparsity' for PRILoRA adapters)")
        self.model = model
        self.every = every
        self.adapter_name = adapter_name
        self.metric = metric
        self.snapshots: list[tuple[int, dict[str, float]]] = []
        self.steps_seen = 0
        self._key = f"rank_history_{id(self)}"
        self._root: nn.Module | None = None
        module_ranks(model, adapter_name)  # fail now, not at the first step, for a wrong adapter name
        if metric == "sparsity":
            try:
                _measure(model, adapter_name, metric)
            except ValueError as e:
                raise ValueError(f"metric='sparsity' is not allowed for this model: {e} (it needs PRILoRA)") from None

    def attach(self) -> "RankHistory":
        # The global hook table must not keep the model alive through this object: hold it weakly.
        history = weakref.ref(self)

        def after_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
            alive = history()
            if alive is not None:
                alive._after_step(model, optimizer)

        self._root = adapted_root(self.model)
        register_step_callbacks(self._root, self._key, post=after_step)
        return self

    def detach(self) -> None:
        if self._root is not None:
            unregister_step_callbacks(self._root, self._key)
            self._root = None

    def record(self, step: int) -> dict[str, float]:
        """Take a snapshot now, labelled ``step`` (e.g. ``record(0)`` before training)."""
        values = _measure(self.model, self.adapter_name, self.metric)
        self.snapshots.append((int(step), values))
        return values

    def _after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.steps_seen += 1
        if self.steps_seen % self.every == 0:
            self.record(self.steps_seen)

    def __enter__(self) -> "RankHistory":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()
