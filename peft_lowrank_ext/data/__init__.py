"""Data bundled with ``peft_lowrank_ext``: a small synthetic review-sentiment set.

``train.csv`` (800 rows) and ``eval.csv`` (200 rows) have the columns ``text`` and ``label``
(1 = positive, 0 = negative). They are produced by :mod:`peft_lowrank_ext.data.make_dataset`.
"""

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
TRAIN_CSV = DATA_DIR / "train.csv"
EVAL_CSV = DATA_DIR / "eval.csv"
LABEL_NAMES = ("negative", "positive")

__all__ = ["DATA_DIR", "TRAIN_CSV", "EVAL_CSV", "LABEL_NAMES"]
