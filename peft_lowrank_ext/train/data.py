"""Load text data: the bundled review set, local CSV/TSV/JSON/JSONL/Parquet files, or a hub data set.

Everything goes through the Hugging Face ``datasets`` library and works offline. The returned
datasets always have exactly two columns, ``text`` (str) and ``label`` (int in ``0..K-1``),
whatever the column names in the source files were.

It also turns rows into model batches (:func:`encode_rows`, :func:`collate`, :func:`row_batches`,
:func:`classification_batches`, :func:`lm_batches`).

Bad input raises :class:`ValueError` with a message that names the offending argument (in both its
Python and its command-line spelling) and, where there is a fixed set, the allowed values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import datasets

from peft_lowrank_ext.data import EVAL_CSV, TRAIN_CSV

#: file suffix -> ``datasets`` builder name
FORMATS: dict[str, str] = {
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}

TEXT = "text"
LABEL = "label"


def _argname(name: str) -> str:
    return f"{name} (--{name.replace('_', '-')})"


@dataclass
class TextClassificationData:
    """A training and an evaluation split with columns ``text`` and ``label``."""

    train: datasets.Dataset
    eval: datasets.Dataset
    num_labels: int
    source: str

    def describe(self) -> str:
        return (f"{self.source}: {len(self.train)} training / {len(self.eval)} evaluation rows, "
                f"{self.num_labels} labels")


def load_table(path: str | Path, arg: str = "train_file") -> datasets.Dataset:
    """Read one local data file into a :class:`datasets.Dataset`.

    ``arg`` is the name of the argument the path came from; it is used in error messages.
    """
    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(
            f"{_argname(arg)}: unsupported file type {p.suffix or '(no suffix)'!r} for {str(path)!r}; "
            f"allowed suffixes: {', '.join(FORMATS)}")
    if not p.is_file():
        raise ValueError(f"{_argname(arg)}: file not found: {str(path)!r}")
    if p.stat().st_size == 0:
        raise ValueError(f"{_argname(arg)}: the data set is empty (0 rows): {str(path)!r}")
    kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
    try:
        dsd = datasets.load_dataset(FORMATS[suffix], data_files={"data": str(p)}, **kwargs)
    except Exception as e:  # the underlying parsers raise many different types
        if "corresponds to no data" in str(e):  # a header without rows
            raise ValueError(f"{_argname(arg)}: the data set is empty (0 rows): {str(path)!r}") from e
        raise ValueError(f"{_argname(arg)}: could not read {str(path)!r} as {FORMATS[suffix]}: {e}") from e
    return dsd["data"]


def normalise_columns(ds: datasets.Dataset, text_column: str, label_column: str, arg: str) -> datasets.Dataset:
    """Select/rename the text and label columns, check their contents and cast labels to int."""
    where = f"{_argname(arg)}"
    if len(ds) == 0:
        raise ValueError(f"{where}: the data set is empty (0 rows)")
    cols = list(ds.column_names)
    for col, opt in ((text_column, "text_column"), (label_column, "label_column")):
        if col not in cols:
            raise ValueError(
                f"{_argname(opt)}: column {col!r} not found in {where} data; available columns: {cols}")
    if text_column == label_column:
        raise ValueError(f"{_argname('text_column')} and {_argname('label_column')} must differ, both are {text_column!r}")
    ds = ds.select_columns([text_column, label_column])

    texts = ds[text_column]
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(
                f"{_argname('text_column')}: column {text_column!r} of {where} must hold strings; "
                f"row {i} holds {t!r} ({type(t).__name__})")

    raw = ds[label_column]
    labels: list[int] = []
    for i, v in enumerate(raw):
        ok = isinstance(v, int) and not isinstance(v, bool)
        if isinstance(v, float) and math.isfinite(v) and v.is_integer():
            v, ok = int(v), True
        if not ok or v < 0:
            raise ValueError(
                f"{_argname('label_column')}: column {label_column!r} of {where} must hold non-negative "
                f"integer class ids (0, 1, ...); row {i} holds {v!r} ({type(v).__name__})")
        labels.append(v)

    ds = ds.remove_columns([label_column])
    if text_column != TEXT:
        ds = ds.rename_column(text_column, TEXT)
    return ds.add_column(LABEL, labels, feature=datasets.Value("int64"))


def limit_rows(ds: datasets.Dataset, n: int | None, arg: str) -> datasets.Dataset:
    """The first ``n`` rows (all for None); ``arg`` names the option in the error for ``n < 1``."""
    if n is None:
        return ds
    if n < 1:
        raise ValueError(f"{_argname(arg)}: must be a positive integer, got {n}")
    return ds.select(range(min(n, len(ds))))


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _hub_offline() -> bool:
    import os

    return any(os.environ.get(k, "").upper() in {"1", "ON", "YES", "TRUE"}
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def load_hub_dataset(name: str, subset: str | None, split_train: str, split_eval: str | None):
    """The training and (optionally) evaluation split of a hub data set or a local data-set folder.

    Any failure to fetch becomes one ``ValueError`` line naming ``--dataset`` (offline use included),
    and a missing split names ``--split-train``/``--split-eval`` with the splits that exist.
    """
    what = repr(name) + (f" (subset {subset!r})" if subset else "")
    try:
        dsd = datasets.load_dataset(name, subset)
    except Exception as e:  # network, missing data set, bad subset: many exception types
        if _hub_offline() or isinstance(e, ConnectionError):
            reason = ("the Hugging Face Hub cannot be reached (offline: HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is "
                      "set or there is no network) and it is not in the local cache")
        else:
            reason = _first_line(e)
        raise ValueError(f"{_argname('dataset')}: cannot load {what}: {reason}; for local files use "
                         f"--train-file/--eval-file") from None
    if not isinstance(dsd, datasets.DatasetDict):
        dsd = datasets.DatasetDict({"train": dsd})
    splits = list(dsd)
    for split, arg in ((split_train, "split_train"), (split_eval, "split_eval")):
        if split is not None and split not in dsd:
            raise ValueError(f"{_argname(arg)}: split {split!r} not found in {what}; allowed: {', '.join(splits)}")
    return dsd[split_train], (dsd[split_eval] if split_eval is not None else None)


def _raw_splits(train_file, eval_file, dataset, subset, split_train, split_eval):
    """``(train, eval or None, source)`` before any column handling; ``None`` train = bundled data."""
    if dataset is not None:
        if train_file is not None or eval_file is not None:
            raise ValueError(f"{_argname('dataset')} cannot be combined with --train-file/--eval-file; give one source")
        train, evald = load_hub_dataset(dataset, subset, split_train, split_eval)
        return train, evald, f"{dataset}" + (f"/{subset}" if subset else "") + f" [{split_train}" + (
            f", {split_eval}]" if split_eval else "]")
    if subset is not None:
        raise ValueError(f"{_argname('subset')} needs {_argname('dataset')} as well")
    if eval_file is not None and train_file is None:
        raise ValueError(f"{_argname('eval_file')} needs {_argname('train_file')} as well")
    if train_file is None:
        return None, None, "bundled review-sentiment data"
    train = load_table(train_file, "train_file")
    if eval_file is not None:
        return train, load_table(eval_file, "eval_file"), f"{train_file} + {eval_file}"
    return train, None, str(train_file)


def _hold_out(train: datasets.Dataset, eval_fraction: float, seed: int, source: str):
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"{_argname('eval_fraction')}: must be in (0, 1), got {eval_fraction}")
    if len(train) < 2:
        raise ValueError(f"{_argname('train_file')}: needs at least 2 rows to hold some out for evaluation")
    split = train.train_test_split(test_size=eval_fraction, seed=seed)
    return split["train"], split["test"], f"{source} (held out {eval_fraction:.0%} for evaluation)"


def load_text_classification(
    train_file: str | Path | None = None,
    eval_file: str | Path | None = None,
    text_column: str = TEXT,
    label_column: str = LABEL,
    *,
    eval_fraction: float = 0.2,
    seed: int = 0,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    dataset: str | None = None,
    subset: str | None = None,
    split_train: str = "train",
    split_eval: str | None = "validation",
) -> TextClassificationData:
    """Load the training and evaluation splits.

    * No files: the bundled review-sentiment set (``peft_lowrank_ext/data/{train,eval}.csv``).
    * ``train_file`` and ``eval_file``: those files.
    * Only ``train_file``: a seeded ``eval_fraction`` of it is held out for evaluation.
    * ``dataset`` (a hub name or a local data-set folder, optional ``subset``): its ``split_train``
      and ``split_eval`` splits via ``datasets.load_dataset``; ``split_eval=None`` holds out
      ``eval_fraction`` of the training split.

    The number of labels is ``max(train labels) + 1``; there must be at least two, and every
    evaluation label must be below it.
    """
    train_raw, eval_raw, source = _raw_splits(train_file, eval_file, dataset, subset, split_train, split_eval)
    if train_raw is None:
        train = normalise_columns(load_table(TRAIN_CSV, "train_file"), TEXT, LABEL, "train_file")
        evald = normalise_columns(load_table(EVAL_CSV, "eval_file"), TEXT, LABEL, "eval_file")
    else:
        train_arg = "dataset" if dataset is not None else "train_file"
        eval_arg = "dataset" if dataset is not None else "eval_file"
        train = normalise_columns(train_raw, text_column, label_column, train_arg)
        if eval_raw is not None:
            evald = normalise_columns(eval_raw, text_column, label_column, eval_arg)
        else:
            train, evald, source = _hold_out(train, eval_fraction, seed, source)

    train = limit_rows(train, max_train_samples, "max_train_samples")
    evald = limit_rows(evald, max_eval_samples, "max_eval_samples")

    train_labels = set(train[LABEL])
    num_labels = max(train_labels) + 1
    if len(train_labels) < 2:
        raise ValueError(
            f"{_argname('label_column')}: the training data has a single class {sorted(train_labels)}; "
            "classification needs at least two")
    bad = sorted(set(evald[LABEL]) - set(range(num_labels)))
    if bad:
        raise ValueError(
            f"{_argname('label_column')}: evaluation labels {bad} do not occur in the training data "
            f"(allowed: 0..{num_labels - 1})")
    return TextClassificationData(train=train, eval=evald, num_labels=num_labels, source=source)


@dataclass
class TextCorpus:
    """Training and evaluation texts (one column ``text``) for causal-LM fine-tuning."""

    train: datasets.Dataset
    eval: datasets.Dataset
    source: str

    def describe(self) -> str:
        return f"{self.source}: {len(self.train)} training / {len(self.eval)} evaluation texts"


def _texts_only(ds: datasets.Dataset, text_column: str, arg: str) -> datasets.Dataset:
    if len(ds) == 0:
        raise ValueError(f"{_argname(arg)}: the data set is empty (0 rows)")
    if text_column not in ds.column_names:
        raise ValueError(f"{_argname('text_column')}: causal-LM fine-tuning needs a text column; {text_column!r} "
                         f"not found in {_argname(arg)} data; available columns: {list(ds.column_names)}")
    ds = ds.select_columns([text_column])
    for i, t in enumerate(ds[text_column]):
        if not isinstance(t, str):
            raise ValueError(f"{_argname('text_column')}: column {text_column!r} of {_argname(arg)} must hold "
                             f"strings; row {i} holds {t!r} ({type(t).__name__})")
    return ds.rename_column(text_column, TEXT) if text_column != TEXT else ds


def load_text_corpus(
    train_file: str | Path | None = None,
    eval_file: str | Path | None = None,
    text_column: str = TEXT,
    *,
    eval_fraction: float = 0.2,
    seed: int = 0,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    dataset: str | None = None,
    subset: str | None = None,
    split_train: str = "train",
    split_eval: str | None = "validation",
) -> TextCorpus:
    """Texts for causal-LM fine-tuning from the same sources as :func:`load_text_classification`."""
    train_raw, eval_raw, source = _raw_splits(train_file, eval_file, dataset, subset, split_train, split_eval)
    if train_raw is None:
        train = _texts_only(load_table(TRAIN_CSV, "train_file"), TEXT, "train_file")
        evald = _texts_only(load_table(EVAL_CSV, "eval_file"), TEXT, "eval_file")
    else:
        train = _texts_only(train_raw, text_column, "dataset" if dataset is not None else "train_file")
        if eval_raw is not None:
            evald = _texts_only(eval_raw, text_column, "dataset" if dataset is not None else "eval_file")
        else:
            train, evald, source = _hold_out(train, eval_fraction, seed, source)
    return TextCorpus(train=limit_rows(train, max_train_samples, "max_train_samples"),
                      eval=limit_rows(evald, max_eval_samples, "max_eval_samples"), source=source)


# ---- tokenising and batching (torch is imported only here, when a run needs it) -----------------------------
def encode_rows(tokenizer, ds: datasets.Dataset, max_length: int) -> list[dict[str, Any]]:
    """Tokenised classification rows (``input_ids``, ``attention_mask``[, ``token_type_ids``], ``labels``)."""
    enc = tokenizer(list(ds[TEXT]), truncation=True, max_length=max_length)
    labels = list(ds[LABEL])
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    return [{**{k: enc[k][i] for k in keys}, "labels": labels[i]} for i in range(len(labels))]


def collate(tokenizer, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One padded batch of tensors from rows of :func:`encode_rows`."""
    import torch

    labels = torch.tensor([r["labels"] for r in rows], dtype=torch.long)
    feats = [{k: v for k, v in r.items() if k != "labels"} for r in rows]
    batch = tokenizer.pad(feats, padding=True, return_tensors="pt")
    batch["labels"] = labels
    return dict(batch)


def row_batches(rows: list, batch_size: int, generator=None) -> Iterator[list]:
    """``rows`` in chunks of ``batch_size``: in order, or shuffled by ``generator`` (a ``torch.Generator``)."""
    if generator is not None:
        import torch

        order = torch.randperm(len(rows), generator=generator).tolist()
    else:
        order = list(range(len(rows)))
    for i in range(0, len(order), batch_size):
        yield [rows[j] for j in order[i : i + batch_size]]


def classification_batches(tokenizer, ds: datasets.Dataset, batch_size: int, max_length: int) -> list[dict[str, Any]]:
    """Ready classification batches with labels, in order (e.g. AutoLoRA's held-out data)."""
    rows = encode_rows(tokenizer, ds, max_length)
    return [collate(tokenizer, chunk) for chunk in row_batches(rows, batch_size)]


def lm_batches(tokenizer, texts: list[str], batch_size: int, max_length: int) -> list[dict[str, Any]]:
    """Ready causal-LM batches (labels = input ids, padding ignored), e.g. AutoLoRA's held-out data."""
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i : i + batch_size], truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt")
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return out


__all__ = ["FORMATS", "TextClassificationData", "TextCorpus", "classification_batches", "collate", "encode_rows",
           "limit_rows", "lm_batches", "load_hub_dataset", "load_table", "load_text_classification", "load_text_corpus",
           "normalise_columns", "row_batches"]
