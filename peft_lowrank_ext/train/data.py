"""Load text data: the bundled review set, local CSV/TSV/JSON/JSONL/Parquet files, or a hub data set.

Everything goes through the Hugging Face ``datasets`` library and works offline. The returned
datasets have the columns ``text`` (str), ``text_pair`` (str, only for sentence pairs) and ``label``
(int in ``0..K-1`` for classification, float for regression), whatever the column names in the
source files were. :func:`load_text_task` is the one-call entry point (a file, two files, a hub
name or in-memory ``datasets`` objects); :func:`load_text_classification` is the file/hub form the
command line uses.

* Sentence pairs: ``text_pair_column`` names the second text; the two are tokenised as a pair,
  ``tokenizer(text, text_pair)``. A text column whose usual pair partner is also in the data
  (``sentence1``/``sentence2``, ``question``/``sentence``, ``question1``/``question2``,
  ``premise``/``hypothesis``, ``#1 String``/``#2 String``) without ``text_pair_column`` is refused,
  not silently trained on one half (``ignore_text_pair=True`` to really use one sentence).
* Regression (STS-B style scores): ``task="regression"``, or ``task="auto"`` picks it when a label
  is a non-integer number; ``num_labels`` is then 1.
* Classification labels must be the class ids ``0..K-1`` (every id seen in training); anything else
  (``{0, 7}``, ``{1..5}``, strings) is refused unless ``remap_labels=True`` maps the sorted distinct
  training labels to ``0..K-1`` (the map is kept in ``label_map``).
* ``.tsv`` files are read with ``quoting=csv.QUOTE_NONE`` (GLUE files have quote characters inside
  sentences) and only empty fields as missing; ``column_names`` names the columns of a file without a
  header row.

It also turns rows into model batches (:func:`encode_rows`, :func:`collate`, :func:`row_batches`,
:func:`classification_batches`, :func:`lm_batches`).

Bad input raises :class:`ValueError` with a message that names the offending argument (in both its
Python and its command-line spelling) and, where there is a fixed set, the allowed values.
"""

from __future__ import annotations

import csv
import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

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
TEXT_PAIR = "text_pair"
LABEL = "label"
#: what a data set can be trained for here; ``"auto"``/None picks one from the labels
LABEL_TASKS = ("classification", "regression")
#: column names that usually hold the two halves of one example (GLUE, SNLI, ...), in (first, second) order
PAIR_PARTNERS: tuple[tuple[str, str], ...] = (
    ("sentence1", "sentence2"), ("question", "sentence"), ("question1", "question2"), ("premise", "hypothesis"),
    ("#1 String", "#2 String"), ("sentence_a", "sentence_b"),
)


def _argname(name: str) -> str:
    return f"{name} (--{name.replace('_', '-')})"


@dataclass
class TextClassificationData:
    """A training and an evaluation split with columns ``text`` [``text_pair``] and ``label``.

    ``task`` is ``"classification"`` (int labels ``0..num_labels-1``) or ``"regression"`` (float
    labels, ``num_labels == 1``); ``label_map`` is the original label -> class id map when the labels
    were remapped (``remap_labels=True``), else None.
    """

    train: datasets.Dataset
    eval: datasets.Dataset
    num_labels: int
    source: str
    task: str = "classification"
    label_map: dict | None = None

    @property
    def is_pair(self) -> bool:
        """True when the examples are sentence pairs (a ``text_pair`` column)."""
        return TEXT_PAIR in self.train.column_names

    def describe(self) -> str:
        kind = (f"regression (float labels, {self.num_labels} output)" if self.task == "regression"
                else f"{self.num_labels} labels")
        pairs = ", sentence pairs" if self.is_pair else ""
        remap = ""
        if self.label_map:
            items = list(self.label_map.items())
            shown = ", ".join(f"{k!r}->{v}" for k, v in items[:6]) + (", ..." if len(items) > 6 else "")
            remap = f" (remapped: {shown})"
        return (f"{self.source}: {len(self.train)} training / {len(self.eval)} evaluation rows, "
                f"{kind}{remap}{pairs}")


def _first_record(p: Path, delimiter: str, quoting: int) -> list[str] | None:
    """The fields of the first non-empty line of a CSV/TSV file (None if unreadable)."""
    try:
        with open(p, newline="", encoding="utf-8", errors="replace") as f:
            for row in csv.reader(f, delimiter=delimiter, quoting=quoting):
                if row:
                    return row
    except OSError:
        return None
    return None


def _first_non_utf8(p: Path, chunk: int = 1 << 20) -> tuple[int, int] | None:
    """``(offset, byte)`` of the first byte of ``p`` that is not valid UTF-8, or None (read in chunks)."""
    import codecs

    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    try:
        with open(p, "rb") as f:
            while True:
                block = f.read(chunk)
                try:
                    decoder.decode(block, final=not block)
                except UnicodeDecodeError as e:  # e.start is relative to the bytes not yet decoded
                    pending = len(e.object) - len(block)
                    return offset - pending + e.start, e.object[e.start]
                if not block:
                    return None
                offset += len(block)
    except OSError:
        return None


def _first_non_space(p: Path, chunk: int = 1 << 16) -> bytes | None:
    """The first byte of ``p`` that is not whitespace (a UTF-8 byte-order mark skipped), or None."""
    with open(p, "rb") as f:
        head = f.read(3)
        block = head[3:] if head == b"\xef\xbb\xbf" else head
        while True:
            stripped = block.lstrip()
            if stripped:
                return stripped[:1]
            block = f.read(chunk)
            if not block:
                return None


def load_table(path: str | Path, arg: str = "train_file", column_names: Sequence[str] | None = None) -> datasets.Dataset:
    """Read one local data file into a :class:`datasets.Dataset`.

    ``arg`` is the name of the argument the path came from; it is used in error messages.
    ``.tsv`` files are read with ``quoting=csv.QUOTE_NONE`` (quote characters are text, as in the GLUE
    files) and only empty fields count as missing. ``column_names``: the column names of a CSV/TSV file
    that has no header row (their number must match the file's fields).
    """
    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(
            f"{_argname(arg)}: unsupported file type {p.suffix or '(no suffix)'!r} for {str(path)!r}; "
            f"allowed suffixes: {', '.join(FORMATS)}")
    if p.is_dir():
        raise ValueError(f"{_argname(arg)}: {str(path)!r} is a folder; pass a data file (for a data-set folder "
                         "use --dataset)")
    if not p.is_file():
        raise ValueError(f"{_argname(arg)}: file not found: {str(path)!r}")
    if p.stat().st_size == 0:
        raise ValueError(f"{_argname(arg)}: the data set is empty (0 rows): {str(path)!r}")
    bad_byte = _first_non_utf8(p) if FORMATS[suffix] != "parquet" else None
    if bad_byte is not None:  # the CSV parser says only "An error occurred while generating the dataset", and
        offset, value = bad_byte  # the JSON reader takes the bytes and fails later, at the first row read
        raise ValueError(f"{_argname(arg)}: {str(path)!r} is not UTF-8 text (byte 0x{value:02x} at byte {offset}, "
                         f"e.g. Latin-1 or Windows-1252 encoded); re-save it as UTF-8")
    if FORMATS[suffix] == "json":  # rows are JSON objects; a bare `null` document even crashes the reader (pyarrow)
        start = _first_non_space(p)
        if start not in (b"{", b"["):
            what = "only whitespace" if start is None else f"{start.decode('utf-8', 'replace')!r}"
            raise ValueError(f"{_argname(arg)}: {str(path)!r} does not hold JSON rows (it starts with {what}); "
                             "allowed: one JSON object per line (.jsonl) or a list of objects (.json)")
    kwargs: dict[str, Any] = {}
    if suffix == ".tsv":
        kwargs = {"delimiter": "\t", "quoting": csv.QUOTE_NONE, "keep_default_na": False, "na_values": [""]}
    if column_names is not None:
        names = [str(c) for c in column_names]
        if FORMATS[suffix] != "csv":
            raise ValueError(f"{_argname('column_names')}: only for .csv/.tsv files without a header row; "
                             f"{str(path)!r} is {FORMATS[suffix]}")
        if not names or len(set(names)) != len(names):
            raise ValueError(f"{_argname('column_names')}: must be distinct, non-empty names, got {names}")
        first = _first_record(p, kwargs.get("delimiter", ","), kwargs.get("quoting", csv.QUOTE_MINIMAL))
        if first is not None and len(first) != len(names):
            raise ValueError(f"{_argname('column_names')}: {len(names)} names {names} for {len(first)} fields per "
                             f"row in {str(path)!r} (first row: {first[:8]})")
        if first is not None and first == names:
            raise ValueError(f"{_argname('column_names')}: {str(path)!r} already has this header row; "
                             "drop --column-names")
        kwargs["column_names"] = names
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its "Failed to read file" log: the error below says it
    try:
        dsd = datasets.load_dataset(FORMATS[suffix], data_files={"data": str(p)}, **kwargs)
    except Exception as e:  # the underlying parsers raise many different types
        if "corresponds to no data" in str(e):  # a header without rows
            raise ValueError(f"{_argname(arg)}: the data set is empty (0 rows): {str(path)!r}") from e
        cause = e
        while cause.__cause__ is not None and "error occurred while generating" in str(cause):
            cause = cause.__cause__  # DatasetGenerationError wraps the parser's own message
        raise ValueError(f"{_argname(arg)}: could not read {str(path)!r} as {FORMATS[suffix]}: "
                         f"{_first_line(cause)}") from e
    finally:
        datasets.logging.set_verbosity(verbosity)
    return dsd["data"]


def pair_partner(text_column: str, columns: Sequence[str]) -> str | None:
    """The column of ``columns`` that usually holds the other half of a pair with ``text_column``
    (see :data:`PAIR_PARTNERS`), or None."""
    by_lower = {c.lower(): c for c in columns}
    for a, b in PAIR_PARTNERS:
        for mine, other in ((a, b), (b, a)):
            if text_column.lower() == mine.lower() and other.lower() in by_lower:
                return by_lower[other.lower()]
    return None


def _check_strings(ds: datasets.Dataset, col: str, original: str, opt: str, where: str) -> None:
    for i, t in enumerate(ds[col]):
        if not isinstance(t, str):
            raise ValueError(f"{_argname(opt)}: column {original!r} of {where} must hold strings; "
                             f"row {i} holds {t!r} ({type(t).__name__})")


def select_text_columns(ds: datasets.Dataset, text_column: str, label_column: str, arg: str, *,
                        text_pair_column: str | None = None, ignore_text_pair: bool = False) -> datasets.Dataset:
    """The text (and pair) and label columns of ``ds`` renamed to ``text`` [``text_pair``] and ``label``;
    texts checked to be strings, labels left as they are (see :func:`prepare_labels`)."""
    where = _argname(arg)
    if len(ds) == 0:
        raise ValueError(f"{where}: the data set is empty (0 rows)")
    cols = list(ds.column_names)
    wanted = [(text_column, "text_column"), (label_column, "label_column")]
    if text_pair_column is not None:
        wanted.insert(1, (text_pair_column, "text_pair_column"))
    for col, opt in wanted:
        if col not in cols:
            hint = ""
            if opt == "text_column" and "," in col and all(c.strip() in cols for c in col.split(",")):
                first, second = (c.strip() for c in col.split(",", 1))
                hint = (f"; for a sentence pair use --text-column {shlex.quote(first)} --text-pair-column "
                        f"{shlex.quote(second)}")
            raise ValueError(f"{_argname(opt)}: column {col!r} not found in {where} data; available columns: "
                             f"{cols}{hint}")
    if text_column == label_column:
        raise ValueError(f"{_argname('text_column')} and {_argname('label_column')} must differ, both are {text_column!r}")
    if text_pair_column is not None and text_pair_column in (text_column, label_column):
        raise ValueError(f"{_argname('text_pair_column')}: must differ from --text-column and --label-column, "
                         f"got {text_pair_column!r}")
    if text_pair_column is None and not ignore_text_pair:
        partner = pair_partner(text_column, cols)
        if partner is not None and partner != label_column:
            first, second = (text_column, partner) if [text_column, partner] == sorted(
                [text_column, partner], key=cols.index) else (partner, text_column)
            raise ValueError(
                f"{_argname('text_column')}: {text_column!r} looks like one half of a sentence pair ({partner!r} is "
                f"also in the {where} data); training on it alone would ignore {partner!r}. Pass "
                f"--text-column {shlex.quote(first)} --text-pair-column {shlex.quote(second)} "
                f"(text_pair_column={second!r}), or "
                "--ignore-text-pair to really use one sentence")
    _check_strings(ds, text_column, text_column, "text_column", where)
    if text_pair_column is not None:
        _check_strings(ds, text_pair_column, text_pair_column, "text_pair_column", where)
    keep = [text_column] + ([text_pair_column] if text_pair_column else []) + [label_column]
    ds = ds.select_columns(keep)
    final = [TEXT] + ([TEXT_PAIR] if text_pair_column else []) + [LABEL]
    tmp = {c: f"__plx_{i}" for i, c in enumerate(keep)}
    ds = ds.rename_columns(tmp)
    return ds.rename_columns({tmp[c]: f for c, f in zip(keep, final)})


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _as_class_id(v: Any):
    """``v`` as an int if it is an integer-valued number, else None."""
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        return int(v)
    return None


def detect_task(labels: Sequence[Any]) -> str:
    """``"regression"`` when every label is a finite number and one is not an integer (STS-B style
    scores), else ``"classification"``."""
    numbers = all(_is_number(v) and math.isfinite(v) for v in labels)
    if numbers and any(isinstance(v, float) and not v.is_integer() for v in labels):
        return "regression"
    return "classification"


def _preview(values: Sequence[Any], n: int = 8) -> str:
    shown = ", ".join(repr(v) for v in values[:n])
    return f"[{shown}{', ...' if len(values) > n else ''}]"


def _class_ids(values: Sequence[Any], where: str, label_column: str) -> list[int]:
    out: list[int] = []
    for i, v in enumerate(values):
        k = _as_class_id(v)
        if k is None or k < 0:
            hint = ""
            if _is_number(v) and math.isfinite(v) and k is None:
                hint = "; for scores (STS-B style) use task='regression' (--task regression)"
            elif isinstance(v, str):
                hint = "; to map string labels to class ids pass remap_labels=True (--remap-labels)"
            raise ValueError(
                f"{_argname('label_column')}: column {label_column!r} of {where} must hold non-negative "
                f"integer class ids (0, 1, ...); row {i} holds {v!r} ({type(v).__name__}){hint}")
        out.append(k)
    return out


def _sort_key(v: Any):
    k = _as_class_id(v)
    return (0, k, "") if k is not None else (1, 0, str(v))


def _classification_labels(train_raw, eval_raw, remap: bool, wheres, label_column: str):
    """``(train ids, eval ids, num_labels, label_map or None)``; cheap checks (no ``range(num_labels)``)."""
    w_train, w_eval = wheres
    if remap:
        for values, where in ((train_raw, w_train), (eval_raw, w_eval)):
            for i, v in enumerate(values):
                if v is None or (isinstance(v, float) and not math.isfinite(v)) or isinstance(v, (list, dict)):
                    raise ValueError(f"{_argname('label_column')}: column {label_column!r} of {where} has no usable "
                                     f"label in row {i}: {v!r}")
        distinct = sorted({_as_class_id(v) if _as_class_id(v) is not None else v for v in train_raw}, key=_sort_key)
        if len(distinct) < 2:
            raise ValueError(f"{_argname('label_column')}: the training data has a single class "
                             f"{_preview(distinct)}; classification needs at least two")
        label_map = {v: i for i, v in enumerate(distinct)}

        def ids(values):
            return [label_map.get(_as_class_id(v) if _as_class_id(v) is not None else v, -1) for v in values]

        train, evald = ids(train_raw), ids(eval_raw)
        unknown = sorted({v for v, k in zip(eval_raw, evald) if k < 0}, key=_sort_key)
        if unknown:
            raise ValueError(f"{_argname('label_column')}: evaluation labels {_preview(unknown)} do not occur in the "
                             f"training data (training labels: {_preview(distinct)})")
        return train, evald, len(distinct), label_map
    train = _class_ids(train_raw, w_train, label_column)
    evald = _class_ids(eval_raw, w_eval, label_column)
    classes = sorted(set(train))
    if len(classes) < 2:
        raise ValueError(f"{_argname('label_column')}: the training data has a single class {classes}; "
                         "classification needs at least two")
    num_labels = classes[-1] + 1
    if len(classes) != num_labels:  # ids with gaps, e.g. {0, 7} or {1, ..., 5}: a head with unused outputs
        missing = num_labels - len(classes)
        raise ValueError(
            f"{_argname('label_column')}: class ids must be 0..K-1 with every id in the training data; it has "
            f"{len(classes)} classes {_preview(classes)}, so a head of {num_labels} outputs would have {missing} "
            f"class(es) never seen; pass remap_labels=True (--remap-labels) to map them to 0..{len(classes) - 1} "
            "in sorted order" + (", or task='regression' (--task regression) for scores" if len(classes) > 2 else ""))
    bad = sorted({k for k in evald if k >= num_labels})
    if bad:
        raise ValueError(f"{_argname('label_column')}: evaluation labels {_preview(bad)} do not occur in the training "
                         f"data (allowed: 0..{num_labels - 1})")
    return train, evald, num_labels, None


def _regression_labels(values: Sequence[Any], where: str, label_column: str) -> list[float]:
    out = []
    for i, v in enumerate(values):
        if not (_is_number(v) and math.isfinite(v)):
            raise ValueError(f"{_argname('label_column')}: column {label_column!r} of {where} must hold finite numbers "
                             f"for regression; row {i} holds {v!r} ({type(v).__name__})")
        out.append(float(v))
    return out


def prepare_labels(train: datasets.Dataset, evald: datasets.Dataset, task: str | None, remap_labels: bool,
                   wheres: tuple[str, str] = ("train_file", "eval_file"), label_column: str = LABEL):
    """Check and cast the ``label`` columns of both splits: ``(train, eval, task, num_labels, label_map)``.

    ``task`` None or ``"auto"``: regression when a training label is a non-integer number, else
    classification.
    """
    if task not in (None, "auto", *LABEL_TASKS):
        raise ValueError(f"task (--task): invalid choice: {task!r} (choose from auto, {', '.join(LABEL_TASKS)})")
    train_raw, eval_raw = list(train[LABEL]), list(evald[LABEL])
    w = (_argname(wheres[0]), _argname(wheres[1]))
    if task in (None, "auto"):
        task = detect_task(train_raw)
    if task == "regression":
        if remap_labels:
            raise ValueError(f"{_argname('remap_labels')}: applies to classification only, not to regression")
        y_train = _regression_labels(train_raw, w[0], label_column)
        y_eval = _regression_labels(eval_raw, w[1], label_column)
        if len(set(y_train)) < 2:
            raise ValueError(f"{_argname('label_column')}: every training label is {y_train[0]!r}; regression needs "
                             "at least two different values")
        feature, num_labels, label_map = datasets.Value("float32"), 1, None
    else:
        y_train, y_eval, num_labels, label_map = _classification_labels(train_raw, eval_raw, remap_labels, w,
                                                                        label_column)
        feature = datasets.Value("int64")
    train = train.remove_columns([LABEL]).add_column(LABEL, y_train, feature=feature)
    evald = evald.remove_columns([LABEL]).add_column(LABEL, y_eval, feature=feature)
    return train, evald, task, num_labels, label_map


def normalise_columns(ds: datasets.Dataset, text_column: str, label_column: str, arg: str, *,
                      text_pair_column: str | None = None, ignore_text_pair: bool = False) -> datasets.Dataset:
    """Select/rename the text (and pair) and label columns, check their contents and cast labels to int
    (non-negative integer class ids; the checks across splits are :func:`prepare_labels`')."""
    ds = select_text_columns(ds, text_column, label_column, arg, text_pair_column=text_pair_column,
                             ignore_text_pair=ignore_text_pair)
    labels = _class_ids(list(ds[LABEL]), _argname(arg), label_column)
    return ds.remove_columns([LABEL]).add_column(LABEL, labels, feature=datasets.Value("int64"))


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
    from peft_lowrank_ext.train.hub import fail_fast_offline

    what = repr(name) + (f" (subset {subset!r})" if subset else "")
    fail_fast_offline(name)  # no Hub: offline mode, so an uncached name fails at once instead of after retries
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


def _raw_splits(train_file, eval_file, dataset, subset, split_train, split_eval, column_names=None):
    """``(train, eval or None, source)`` before any column handling; ``None`` train = bundled data."""
    if dataset is not None:
        if train_file is not None or eval_file is not None:
            raise ValueError(f"{_argname('dataset')} cannot be combined with --train-file/--eval-file; give one source")
        if column_names is not None:
            raise ValueError(f"{_argname('column_names')} is for --train-file/--eval-file CSV/TSV files without a "
                             "header, not for --dataset")
        train, evald = load_hub_dataset(dataset, subset, split_train, split_eval)
        return train, evald, f"{dataset}" + (f"/{subset}" if subset else "") + f" [{split_train}" + (
            f", {split_eval}]" if split_eval else "]")
    if subset is not None:
        raise ValueError(f"{_argname('subset')} needs {_argname('dataset')} as well")
    if eval_file is not None and train_file is None:
        raise ValueError(f"{_argname('eval_file')} needs {_argname('train_file')} as well")
    if train_file is None:
        if column_names is not None:
            raise ValueError(f"{_argname('column_names')} needs {_argname('train_file')} (a CSV/TSV file without a "
                             "header)")
        return None, None, "bundled review-sentiment data"
    train = load_table(train_file, "train_file", column_names)
    if eval_file is not None:
        return train, load_table(eval_file, "eval_file", column_names), f"{train_file} + {eval_file}"
    return train, None, str(train_file)


def _hold_out(train: datasets.Dataset, eval_fraction: float, seed: int, source: str):
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"{_argname('eval_fraction')}: must be in (0, 1), got {eval_fraction}")
    if len(train) < 2:
        raise ValueError(f"{_argname('train_file')}: needs at least 2 rows to hold some out for evaluation")
    split = train.train_test_split(test_size=eval_fraction, seed=seed)
    return split["train"], split["test"], f"{source} (held out {eval_fraction:.0%} for evaluation)"


def _finish(train_raw, eval_raw, source: str, args: tuple[str, str], *, text_column, text_pair_column, label_column,
            ignore_text_pair, task, remap_labels, eval_fraction, seed, max_train_samples, max_eval_samples):
    """Columns, hold-out, limits and labels: the common tail of :func:`load_text_classification` and
    :func:`load_text_task`."""
    if task == "causal-lm":
        raise ValueError("task (--task): 'causal-lm' data is loaded with load_text_corpus, not as labelled text")
    cols = dict(text_pair_column=text_pair_column, ignore_text_pair=ignore_text_pair)
    train = select_text_columns(train_raw, text_column, label_column, args[0], **cols)
    if eval_raw is not None:
        evald = select_text_columns(eval_raw, text_column, label_column, args[1], **cols)
    else:
        train, evald, source = _hold_out(train, eval_fraction, seed, source)
    train = limit_rows(train, max_train_samples, "max_train_samples")
    evald = limit_rows(evald, max_eval_samples, "max_eval_samples")
    train, evald, task, num_labels, label_map = prepare_labels(
        train, evald, task, remap_labels, (args[0], args[1] if eval_raw is not None else args[0]), label_column)
    return TextClassificationData(train=train, eval=evald, num_labels=num_labels, source=source, task=task,
                                  label_map=label_map)


def load_text_classification(
    train_file: str | Path | None = None,
    eval_file: str | Path | None = None,
    text_column: str = TEXT,
    label_column: str = LABEL,
    *,
    text_pair_column: str | None = None,
    ignore_text_pair: bool = False,
    task: str | None = "classification",
    remap_labels: bool = False,
    column_names: Sequence[str] | None = None,
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
    * ``train_file`` and ``eval_file``: those files (``column_names`` for CSV/TSV without a header).
    * Only ``train_file``: a seeded ``eval_fraction`` of it is held out for evaluation.
    * ``dataset`` (a hub name or a local data-set folder, optional ``subset``): its ``split_train``
      and ``split_eval`` splits via ``datasets.load_dataset``; ``split_eval=None`` holds out
      ``eval_fraction`` of the training split.

    ``text_pair_column``: the second text of sentence pairs. ``task``: ``"classification"`` (the
    default here), ``"regression"`` or ``"auto"``/None (regression iff a label is a non-integer
    number). Classification: the labels are class ids ``0..K-1``, every one present in the training
    data (``num_labels = K``), and every evaluation label is one of them; ``remap_labels=True`` maps
    any other labels (``{0, 7}``, strings) to ``0..K-1`` in sorted order. Regression: finite numbers,
    ``num_labels = 1``.
    """
    train_raw, eval_raw, source = _raw_splits(train_file, eval_file, dataset, subset, split_train, split_eval,
                                              column_names)
    if train_raw is None:
        train_raw, eval_raw = load_table(TRAIN_CSV, "train_file"), load_table(EVAL_CSV, "eval_file")
        text_column, label_column, text_pair_column = TEXT, LABEL, None
    train_arg = "dataset" if dataset is not None else "train_file"
    eval_arg = "dataset" if dataset is not None else "eval_file"
    return _finish(train_raw, eval_raw, source, (train_arg, eval_arg), text_column=text_column,
                   text_pair_column=text_pair_column, label_column=label_column, ignore_text_pair=ignore_text_pair,
                   task=task, remap_labels=remap_labels, eval_fraction=eval_fraction, seed=seed,
                   max_train_samples=max_train_samples, max_eval_samples=max_eval_samples)


def load_text_task(
    source: str | Path | tuple | list | dict | datasets.Dataset | datasets.DatasetDict,
    text_column: str = TEXT,
    text_pair_column: str | None = None,
    label_column: str = LABEL,
    *,
    task: str | None = "auto",
    remap_labels: bool = False,
    ignore_text_pair: bool = False,
    subset: str | None = None,
    split_train: str = "train",
    split_eval: str | None = "validation",
    column_names: Sequence[str] | None = None,
    eval_fraction: float = 0.2,
    seed: int = 0,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
) -> TextClassificationData:
    """Single-sentence classification, sentence-pair classification or regression data in one call,
    ready for :func:`~peft_lowrank_ext.train.loop.train_classifier` (``data.task``, ``data.num_labels``).

    ``source`` is one of:

    * a local file (``.csv/.tsv/.json/.jsonl/.parquet``): ``eval_fraction`` of it is held out;
    * ``(train_file, eval_file)`` or ``{"train": file, "eval": file}`` (``"validation"`` also accepted);
    * a hub data set name or local data-set folder (e.g. ``"glue"`` with ``subset="stsb"``), read with
      ``datasets.load_dataset`` and its ``split_train``/``split_eval`` splits;
    * a ``datasets.DatasetDict`` (its ``split_train``/``split_eval`` splits) or a ``datasets.Dataset``
      (``eval_fraction`` held out).

    ``task="auto"`` (default) picks regression when a training label is a non-integer number.
    Example: ``load_text_task("glue", "sentence1", "sentence2", subset="mrpc")``.
    """
    kwargs = dict(text_column=text_column, text_pair_column=text_pair_column, label_column=label_column,
                  ignore_text_pair=ignore_text_pair, task=task, remap_labels=remap_labels, eval_fraction=eval_fraction,
                  seed=seed, max_train_samples=max_train_samples, max_eval_samples=max_eval_samples)
    if isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
        if subset is not None or column_names is not None:
            raise ValueError("subset/column_names (--subset/--column-names) do not apply to in-memory datasets")
        if isinstance(source, datasets.Dataset):
            return _finish(source, None, "in-memory data set", ("dataset", "dataset"), **kwargs)
        for split, arg in ((split_train, "split_train"), (split_eval, "split_eval")):
            if split is not None and split not in source:
                raise ValueError(f"{_argname(arg)}: split {split!r} not found; allowed: {', '.join(source)}")
        evald = source[split_eval] if split_eval is not None else None
        name = f"in-memory data set [{split_train}" + (f", {split_eval}]" if split_eval else "]")
        return _finish(source[split_train], evald, name, ("dataset", "dataset"), **kwargs)
    common = dict(kwargs, column_names=column_names)
    if isinstance(source, dict):
        unknown = set(source) - {"train", "eval", "validation"}
        if "train" not in source or unknown or ("eval" in source and "validation" in source):
            raise ValueError(f"source: a dict needs the key 'train' and optionally one of 'eval'/'validation'; got "
                             f"keys {sorted(source)}")
        return load_text_classification(source["train"], source.get("eval", source.get("validation")), **common)
    if isinstance(source, (tuple, list)):
        if len(source) != 2:
            raise ValueError(f"source: a sequence must be (train_file, eval_file), got {len(source)} items")
        return load_text_classification(source[0], source[1], **common)
    if not isinstance(source, (str, Path)):
        raise ValueError(f"source: must be a file, (train_file, eval_file), a data-set name/folder or a datasets "
                         f"object, got {type(source).__name__}")
    if Path(source).suffix.lower() in FORMATS:
        return load_text_classification(source, **common)
    if column_names is not None:
        raise ValueError(f"{_argname('column_names')} is for CSV/TSV files, not for the data set {str(source)!r}")
    return load_text_classification(dataset=str(source), subset=subset, split_train=split_train,
                                    split_eval=split_eval, **kwargs)


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
    column_names: Sequence[str] | None = None,
) -> TextCorpus:
    """Texts for causal-LM fine-tuning from the same sources as :func:`load_text_classification`."""
    train_raw, eval_raw, source = _raw_splits(train_file, eval_file, dataset, subset, split_train, split_eval,
                                              column_names)
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
    """Tokenised rows (``input_ids``, ``attention_mask``[, ``token_type_ids``], ``labels``); a
    ``text_pair`` column is tokenised as the second text of a pair, ``tokenizer(text, text_pair)``.
    Labels stay ints (classification) or floats (regression)."""
    pairs = list(ds[TEXT_PAIR]) if TEXT_PAIR in ds.column_names else None
    enc = tokenizer(list(ds[TEXT]), pairs, truncation=True, max_length=max_length)
    labels = list(ds[LABEL])
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    return [{**{k: enc[k][i] for k in keys}, "labels": labels[i]} for i in range(len(labels))]


def collate(tokenizer, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One padded batch of tensors from rows of :func:`encode_rows` (float labels for regression)."""
    import torch

    regression = bool(rows) and isinstance(rows[0]["labels"], float)
    labels = torch.tensor([r["labels"] for r in rows], dtype=torch.float32 if regression else torch.long)
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


__all__ = ["FORMATS", "LABEL_TASKS", "PAIR_PARTNERS", "TextClassificationData", "TextCorpus", "classification_batches",
           "collate", "detect_task", "encode_rows", "limit_rows", "lm_batches", "load_hub_dataset", "load_table",
           "load_text_classification", "load_text_corpus", "load_text_task", "normalise_columns", "pair_partner",
           "prepare_labels", "row_batches", "select_text_columns"]
