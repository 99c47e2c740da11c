"""Where a module sits in the model's stack of blocks, and the linear rank that depth gets.

PRILoRA's ranks grow with depth, so every target needs its block index ``l`` and the number of
blocks ``L``. Both are read from the model itself: ``l`` from the module name (the leftmost
``<list>.<N>.`` segment of a known block-list name, or a user regex), ``L`` from the length of that
block list (or ``num_blocks``). Encoder and decoder stacks each count their own depth.
"""

from __future__ import annotations

import math
import re

from torch import nn

# The block lists of GPT-2 (transformer.h.N), Llama/Qwen2/Mistral (model.layers.N), OPT
# (model.decoder.layers.N), BERT/RoBERTa/MiniLM (encoder.layer.N), T5/ViT-style (block.N, blocks.N).
DEFAULT_BLOCK_PATTERN = r"(?:^|\.)(?:h|layers|layer|blocks|block)\.(\d+)(?=\.|$)"

_HELP = ("pass PriLoraConfig(block_index_pattern=r'<regex with one group capturing the block index>') and, if the "
         "block list cannot be measured, num_blocks=<L>; or leave the module out with exclude_modules")


def linear_rank(r_first: int, r_last: int, index: int, num_blocks: int) -> int:
    """``round(r_first + (r_last − r_first)·l/(L−1))`` with halves rounded up; ``r_first`` for ``L = 1``."""
    if num_blocks <= 1:
        return int(r_first)
    exact = r_first + (r_last - r_first) * index / (num_blocks - 1)
    return max(1, int(math.floor(exact + 0.5)))


def linear_ranks(r_first: int, r_last: int, num_blocks: int) -> list[int]:
    return [linear_rank(r_first, r_last, i, num_blocks) for i in range(num_blocks)]


def _list_length(model: nn.Module, head: str, pattern: re.Pattern) -> int | None:
    """Length of the block list named by ``head`` (e.g. ``model.layers.``) or, failing that, max index + 1."""
    list_name = head.rstrip(".")
    if list_name:
        try:
            blocks = model.get_submodule(list_name)
        except AttributeError:
            blocks = None
        if isinstance(blocks, (nn.ModuleList, nn.Sequential)):
            return len(blocks)
    indices = []
    for name, _ in model.named_modules():
        match = pattern.search(name)
        if match and name[: match.start(1)] == head:
            indices.append(int(match.group(1)))
    return max(indices) + 1 if indices else None


def block_position(model: nn.Module, module_name: str, pattern: str | None = None,
                   num_blocks: int | None = None) -> tuple[int, int]:
    """``(l, L)`` of ``module_name`` in ``model``; raises ``ValueError`` naming the module when unknown."""
    regex = re.compile(pattern or DEFAULT_BLOCK_PATTERN)
    match = regex.search(module_name)
    which = f"block_index_pattern={pattern!r}" if pattern else "the default block-index patterns"
    if match is None:
        raise ValueError(f"PRILoRA: cannot find the block index of module {module_name!r} with {which}; {_HELP}")
    try:
        index = int(match.group(1))
    except (TypeError, ValueError):
        raise ValueError(f"PRILoRA: {which} captured {match.group(1)!r} in module {module_name!r}, which is not a "
                         f"block index (an integer); {_HELP}") from None
    if num_blocks is None:
        num_blocks = _list_length(model, module_name[: match.start(1)], regex)
        if num_blocks is None:
            raise ValueError(f"PRILoRA: cannot find the number of blocks for module {module_name!r}; {_HELP}")
    if not 0 <= index < num_blocks:
        raise ValueError(f"PRILoRA: module {module_name!r} has block index {index}, outside [0, {num_blocks - 1}] "
                         f"for num_blocks={num_blocks}; {_HELP}")
    return index, num_blocks
