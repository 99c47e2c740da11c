"""Offline tokenizer, datasets and callbacks for Trainer / SFTTrainer tests."""

from __future__ import annotations

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, TrainerCallback

from models import VOCAB

WORDS = [f"w{i}" for i in range(VOCAB - 4)]


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def text_dataset(n: int = 16, seed: int = 0) -> Dataset:
    gen = torch.Generator().manual_seed(seed)
    texts = []
    for _ in range(n):
        length = int(torch.randint(4, 9, (1,), generator=gen))
        texts.append(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (length,), generator=gen)))
    return Dataset.from_dict({"text": texts})


def lm_dataset(n: int = 16, seq: int = 8, seed: int = 0) -> Dataset:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (n, seq), generator=gen).tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * seq] * n, "labels": ids})


class GradientCapture(TrainerCallback):
    """Gradients of trainable params just before (task only) and just after the optimizer step."""

    def __init__(self):
        self.before: list[dict[str, torch.Tensor]] = []
        self.after: list[dict[str, torch.Tensor]] = []
        self.params_before: list[dict[str, torch.Tensor]] = []

    @staticmethod
    def _grads(model):
        return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.before.append(self._grads(model))
        self.params_before.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.after.append(self._grads(model))
