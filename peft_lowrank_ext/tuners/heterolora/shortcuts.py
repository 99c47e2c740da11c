"""LoRA-adapted shortcuts added to transformer blocks by forward hooks — no model code is edited.

Per block, with ``h_a`` the residual stream entering the attention sub-block and ``h_f`` the one
entering the feed-forward sub-block:

* ``residual_1``: ``(I + ΔS) h_a`` replaces the residual around attention → ``ΔS h_a`` is added
  where the attention output joins the residual;
* ``residual_2``: likewise around the FFN → ``ΔS h_f`` is added where the FFN output joins it;
* ``shortcut_sa``: ``ΔS h_a`` (the block's input) is added after the FFN;
* ``shortcut_ffn``: ``ΔS h_f`` of the *previous* block is added after this block's attention
  (none in block 0).

Where those points are depends on the block layout, found by module names (not by model type, so
look-alike architectures work too):

* pre-LN GPT-2 style (``ln_1``, ``attn``, ``ln_2``, ``mlp``) and Llama style (``input_layernorm``,
  ``self_attn``, ``post_attention_layernorm``, ``mlp`` — Mistral, Qwen2, ... share it): ``h_a`` /
  ``h_f`` are the inputs of the two norms, the deltas are added to the outputs of the attention
  and the MLP modules (which the block then adds to the residual);
* post-LN BERT style (``attention.output.LayerNorm``, ``intermediate``, ``output.LayerNorm``;
  RoBERTa, MiniLM, ...): ``h_a`` is the input of ``attention``, ``h_f`` the output of the first
  LayerNorm; the deltas are added to the inputs of the two LayerNorms (i.e. inside the residual sum,
  before normalisation, as the residual itself);
* OPT (``self_attn_layer_norm``, ``self_attn``, ``final_layer_norm``, ``fc1``, ``fc2``), told apart by
  the block's ``do_layer_norm_before``. ``h_a`` is the block input in both variants. Post-LN
  (OPT-350M): ``h_f`` is the output of ``self_attn_layer_norm``, the deltas are added to the inputs
  of ``self_attn_layer_norm`` and ``final_layer_norm`` (inside the residual sum, as for BERT). Pre-LN
  (the other OPT sizes): ``h_f`` is the input of ``final_layer_norm``, the deltas are added to the
  outputs of ``self_attn`` and ``fc2`` — so in training they pass the block's dropout, as the
  attention / FFN outputs do. OPT's FFN works on a flattened ``(tokens, hidden)`` view: deltas are
  reshaped to the shape they join.

  The authors' OPT code (``modeling_opt_lora_ags.py``) instead adds ``shortcut_ffn`` / ``shortcut_sa``
  *after* the block's post-attention / final LayerNorm and applies that same LayerNorm a second time
  (``LN(ΔS h + LN(z))``), which changes the base model even when ΔS = 0. Here a zero shortcut leaves
  the model exactly unchanged (tested); the authors' double LayerNorm is not offered.

Other layouts (e.g. Gemma-2's extra norms, T5) raise a ``ValueError`` at wrap time.

With reentrant gradient checkpointing the recomputed block sees the previous block's ``h_f`` as a
constant, so no gradient flows back through ``shortcut_ffn`` into the previous block (its own
parameters still get theirs); non-reentrant checkpointing is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .layer import HeteroShortcut

SHORTCUT_ATTR = {
    "residual_1": "hetero_residual_1",
    "residual_2": "hetero_residual_2",
    "shortcut_sa": "hetero_shortcut_sa",
    "shortcut_ffn": "hetero_shortcut_ffn",
}
TAP_ATTR = "_hetero_tap"


@dataclass(frozen=True)
class BlockStyle:
    name: str
    attn_in: tuple[str, str]  # (submodule, "in" = its first input | "out" = its output)
    attn_out: tuple[str, str]  # (submodule, "in" = add to its first input | "out" = add to its output)
    ffn_in: tuple[str, str]
    ffn_out: tuple[str, str]
    required: tuple[str, ...] = ()
    forbidden: tuple[str, ...] = ()
    layer_norm_before: Optional[bool] = None  # OPT: must equal the block's ``do_layer_norm_before``

    def paths(self) -> tuple[str, ...]:
        return (self.attn_in[0], self.attn_out[0], self.ffn_in[0], self.ffn_out[0]) + self.required

    def matches(self, block: nn.Module) -> bool:
        if self.layer_norm_before is not None and getattr(block, "do_layer_norm_before", None) is not self.layer_norm_before:
            return False
        return all(_has(block, p) for p in self.paths()) and not any(_has(block, p) for p in self.forbidden)


STYLES = (
    BlockStyle("gpt2", ("ln_1", "in"), ("attn", "out"), ("ln_2", "in"), ("mlp", "out")),
    BlockStyle("llama", ("input_layernorm", "in"), ("self_attn", "out"), ("post_attention_layernorm", "in"),
               ("mlp", "out"), forbidden=("pre_feedforward_layernorm", "post_feedforward_layernorm")),
    BlockStyle("bert", ("attention", "in"), ("attention.output.LayerNorm", "in"),
               ("attention.output.LayerNorm", "out"), ("output.LayerNorm", "in"), required=("intermediate",)),
    # "" is the block itself: its first input is h_a
    BlockStyle("opt_pre_ln", ("", "in"), ("self_attn", "out"), ("final_layer_norm", "in"), ("fc2", "out"),
               required=("self_attn_layer_norm", "fc1"), layer_norm_before=True),
    BlockStyle("opt_post_ln", ("", "in"), ("self_attn_layer_norm", "in"), ("self_attn_layer_norm", "out"),
               ("final_layer_norm", "in"), required=("self_attn", "fc1", "fc2"), layer_norm_before=False),
)


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def find_blocks(root: nn.Module) -> tuple[str, list[nn.Module], BlockStyle]:
    """The transformer blocks (the first ``ModuleList`` whose entries all share a supported layout)."""
    for name, module in root.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            for style in STYLES:
                if all(style.matches(block) for block in module):
                    return name, list(module), style
    raise ValueError(
        f"HeteroLoraConfig.shortcuts is not supported for {type(root).__name__}: no list of transformer blocks with "
        "a known layout was found (supported: GPT-2 style ln_1/attn/ln_2/mlp, Llama style input_layernorm/self_attn/"
        "post_attention_layernorm/mlp, BERT style attention.output.LayerNorm/intermediate/output.LayerNorm, OPT "
        "self_attn_layer_norm/self_attn/final_layer_norm/fc1/fc2, pre- or post-LN). "
        "Use shortcuts=None for this model."
    )


def _hidden_size(root: nn.Module, block: nn.Module, style: BlockStyle) -> int:
    size = getattr(getattr(root, "config", None), "hidden_size", None)
    if isinstance(size, int):
        return size
    norm = block.get_submodule(style.ffn_in[0])  # a norm over the hidden size in every supported layout
    weight = getattr(norm, "weight", None)
    if weight is None:
        raise ValueError(f"HeteroLoraConfig.shortcuts: cannot find the hidden size of {type(root).__name__}")
    return int(weight.shape[-1])


def _first(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    return next(iter(kwargs.values()))


def _replace_first(args: tuple, kwargs: dict, value: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (value,) + tuple(args[1:]), kwargs
    key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
    return args, {**kwargs, key: value}


def _fit(delta: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """OPT's FFN runs on a flattened (tokens, hidden) view of the (batch, seq, hidden) stream."""
    if delta.shape == like.shape or delta.numel() != like.numel():  # (a 0-dim DDP tie broadcasts)
        return delta
    return delta.reshape(like.shape)


def _add_to_output(output, delta: torch.Tensor):
    if torch.is_tensor(output):
        return output + _fit(delta, output).to(output.dtype)
    if isinstance(output, tuple):
        return (output[0] + _fit(delta, output[0]).to(output[0].dtype),) + tuple(output[1:])
    raise TypeError(f"HeteroLoRA shortcut: cannot add to a module output of type {type(output).__name__}")


class BlockTap:
    """Hooks of one block: captures ``h_a``/``h_f`` and adds the shortcut deltas (lives on the block)."""

    def __init__(self, block: nn.Module, style: BlockStyle, prev: Optional["BlockTap"]):
        self.block = block
        self.style = style
        self.prev = prev
        self.h_attn: Optional[torch.Tensor] = None
        self.h_ffn: Optional[torch.Tensor] = None
        self.handles = []
        self._install()

    def shortcut(self, kind: str) -> Optional[HeteroShortcut]:
        return self.block._modules.get(SHORTCUT_ATTR[kind])

    def _install(self) -> None:
        s = self.style
        self._capture(s.attn_in, "h_attn")
        self._add(s.attn_out, self._attn_delta)
        self._capture(s.ffn_in, "h_ffn")
        self._add(s.ffn_out, self._ffn_delta)

    def _capture(self, point: tuple[str, str], slot: str) -> None:
        module = self.block.get_submodule(point[0])
        if point[1] == "in":
            def hook(mod, args, kwargs):
                setattr(self, slot, _first(args, kwargs))
            self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        else:
            def hook(mod, args, output):
                setattr(self, slot, output if torch.is_tensor(output) else output[0])
            self.handles.append(module.register_forward_hook(hook))

    def _add(self, point: tuple[str, str], delta_fn) -> None:
        module = self.block.get_submodule(point[0])
        if point[1] == "in":
            def hook(mod, args, kwargs):
                delta = delta_fn()
                if delta is None:
                    return None
                x = _first(args, kwargs)
                return _replace_first(args, kwargs, x + _fit(delta, x).to(x.dtype))
            self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        else:
            def hook(mod, args, output):
                delta = delta_fn()
                if delta is None:
                    return None
                return _add_to_output(output, delta)
            self.handles.append(module.register_forward_hook(hook))

    @staticmethod
    def _sum(*terms):
        out = None
        for t in terms:
            if t is not None:
                out = t if out is None else out + _fit(t, out)
        return out

    def _apply(self, kind: str, h: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        module = self.shortcut(kind)
        if module is None or h is None:
            return None
        return module.delta(h)

    def _attn_delta(self) -> Optional[torch.Tensor]:
        prev_h = self.prev.h_ffn if self.prev is not None else None
        return self._sum(self._apply("residual_1", self.h_attn), self._apply("shortcut_ffn", prev_h))

    def _ffn_delta(self) -> Optional[torch.Tensor]:
        return self._sum(self._apply("residual_2", self.h_ffn), self._apply("shortcut_sa", self.h_attn))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.h_attn = self.h_ffn = None


def attach_shortcuts(root: nn.Module, config, adapter_name: str, active_adapters) -> list[HeteroShortcut]:
    """Add ``config.shortcuts`` of ``adapter_name`` to every block (creating hooks once per block)."""
    if not config.shortcuts:
        return []
    _, blocks, style = find_blocks(root)
    hidden = _hidden_size(root, blocks[0], style)
    created = []
    prev = None
    for index, block in enumerate(blocks):
        tap = block.__dict__.get(TAP_ATTR)
        if tap is None:
            tap = BlockTap(block, style, prev)
            object.__setattr__(block, TAP_ATTR, tap)
        prev = tap
        param = next(block.parameters(), None)
        device = param.device if param is not None else None
        for kind in config.shortcuts:
            if kind == "shortcut_ffn" and index == 0:
                continue  # there is no previous block
            attr = SHORTCUT_ATTR[kind]
            module = block._modules.get(attr)
            if module is None:
                module = HeteroShortcut(hidden, kind, adapter_name, config, active_adapters, device,
                                        config.shortcut_r, config.shortcut_alpha)
                if adapter_name not in active_adapters:
                    module.requires_grad_(False)
                block.add_module(attr, module)
            else:
                module.update_layer(adapter_name, config, config.shortcut_r, config.shortcut_alpha)
            created.append(module)
    return created


def remove_shortcuts(root: nn.Module) -> None:
    """Remove every shortcut module and hook (what ``unload`` / ``merge_and_unload`` leave is the base model)."""
    for module in list(root.modules()):
        tap = module.__dict__.get(TAP_ATTR)
        if tap is not None:
            tap.remove()
            del module.__dict__[TAP_ATTR]
        for attr in SHORTCUT_ATTR.values():
            if attr in module._modules:
                del module._modules[attr]
