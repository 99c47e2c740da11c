"""Sentence pairs, regression (STS-B style scores), label checks and GLUE-style TSV files.

Data loading (``peft_lowrank_ext.train.data``), the plain loop's regression path and
``load_text_task`` — offline, on a tiny BERT built from a config with a word-level tokenizer.
"""

from __future__ import annotations

import math
import time

import datasets
import pytest
import torch

import peft_lowrank_ext  # noqa: F401  (registers the methods with PEFT)
from peft_lowrank_ext.train.data import (PAIR_PARTNERS, TEXT_PAIR, detect_task, encode_rows, load_table,
                                         load_text_classification, load_text_task)
from peft_lowrank_ext.train.loop import train_classifier
from peft_lowrank_ext.train.measure import average_ranks, pearson, spearman
from peft_lowrank_ext.train.models import load_model_and_tokenizer, wrap_classifier
from peft_lowrank_ext.train.run import TrainingConfig
from test_training import EASY_NEG, EASY_POS, FILLER, easy_rows, save_tiny_bert, write_csv

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert-tasks"))


def _dd(**cols) -> datasets.DatasetDict:
    ds = datasets.Dataset.from_dict(cols)
    return datasets.DatasetDict(train=ds, validation=ds)


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")


def pair_rows(n: int, seed: int):
    """(filler sentence, sentence with a sentiment word, label from the SECOND sentence only)."""
    g = torch.Generator().manual_seed(seed)

    def pick(words):
        return words[int(torch.randint(len(words), (1,), generator=g))]

    rows = []
    for i in range(n):
        label = i % 2
        first = " ".join(pick(FILLER) for _ in range(3))
        second = " ".join([pick(FILLER), pick(EASY_POS if label else EASY_NEG), pick(FILLER)])
        rows.append((first, second, label))
    return rows


# ----- GLUE-style TSV ---------------------------------------------------------------------------------
def test_tsv_keeps_quote_characters_and_na_text(tmp_path):
    """QUOTE_NONE: a lone '"' does not swallow the following lines; 'NA' stays text."""
    path = tmp_path / "mrpc.tsv"
    path.write_text('Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n'
                    '1\t1\t2\tHe said "hi there\tShe said "no"\n'
                    '0\t3\t4\tA "quoted" thing\tNA\n'
                    '1\t5\t6\tx\ty\n', encoding="utf-8")
    data = load_text_classification(path, path, "#1 String", "Quality", text_pair_column="#2 String")
    assert list(data.train["text"]) == ['He said "hi there', 'A "quoted" thing', "x"]
    assert list(data.train[TEXT_PAIR]) == ['She said "no"', "NA", "y"]
    assert list(data.train["label"]) == [1, 0, 1] and data.is_pair


def test_headerless_tsv_with_column_names(tmp_path):
    path = tmp_path / "cola.tsv"
    path.write_text("gj04\t1\t\tOur friends won't buy \"this analysis\ngj04\t0\t*\tThey drank the pub.\n")
    data = load_text_classification(path, path, "sentence", "label",
                                    column_names=["source", "label", "original", "sentence"])
    assert list(data.train["text"]) == ["Our friends won't buy \"this analysis", "They drank the pub."]
    assert list(data.train["label"]) == [1, 0]
    with pytest.raises(ValueError, match=r"--column-names.*3 names.*4 fields"):
        load_table(path, column_names=["a", "label", "sentence"])
    with_header = tmp_path / "h.tsv"
    with_header.write_text("sentence\tlabel\nok\t1\n")
    with pytest.raises(ValueError, match=r"--column-names.*already has this header"):
        load_table(with_header, column_names=["sentence", "label"])
    with pytest.raises(ValueError, match=r"--column-names.*only for \.csv/\.tsv"):
        load_table(tmp_path / "x.json" if (tmp_path / "x.json").write_text("[]") else None, column_names=["a"])


# ----- sentence pairs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("first, second", PAIR_PARTNERS)
@pytest.mark.parametrize("chosen", [0, 1])
def test_one_half_of_a_pair_is_refused(first, second, chosen):
    cols = {first: ["a", "b"], second: ["c", "d"], "label": [0, 1]}
    text = (first, second)[chosen]
    with pytest.raises(ValueError, match=r"--text-column.*looks like one half of a sentence pair.*--text-pair-column"):
        load_text_task(_dd(**cols), text)
    data = load_text_task(_dd(**cols), first, second)
    assert list(data.train["text"]) == ["a", "b"] and list(data.train[TEXT_PAIR]) == ["c", "d"]
    single = load_text_task(_dd(**cols), text, ignore_text_pair=True)  # the explicit way to use one half
    assert not single.is_pair


def test_comma_form_gets_a_hint():
    with pytest.raises(ValueError, match=r"not found.*use --text-column sentence1 --text-pair-column sentence2"):
        load_text_task(_dd(sentence1=["a", "b"], sentence2=["c", "d"], label=[0, 1]), "sentence1,sentence2")


def test_pairs_are_tokenised_as_pairs(tiny_model):
    _, tok = load_model_and_tokenizer(str(tiny_model), 2)
    data = load_text_task(_dd(sentence1=["the food", "it was"], sentence2=["good film", "bad"], label=[1, 0]),
                          "sentence1", "sentence2")
    rows = encode_rows(tok, data.train, 32)
    expected = tok(["the food", "it was"], ["good film", "bad"])
    assert [r["input_ids"] for r in rows] == expected["input_ids"]
    assert rows[0]["input_ids"].count(tok.sep_token_id) == 2
    single = encode_rows(tok, load_text_task(_dd(sentence1=["the food", "it was"], sentence2=["x", "y"],
                                                  label=[1, 0]), "sentence1", ignore_text_pair=True).train, 32)
    assert len(rows[0]["input_ids"]) == len(single[0]["input_ids"]) + 3  # "good film" + [SEP]


def test_pair_classification_learns_from_the_second_sentence(tiny_model, tmp_path):
    """The label is in the second sentence only: trained on one half this stays near 50%."""
    train, evald = pair_rows(96, 1), pair_rows(40, 2)
    a = write_csv(tmp_path / "train.csv", train, header=("sentence1", "sentence2", "label"))
    b = write_csv(tmp_path / "eval.csv", evald, header=("sentence1", "sentence2", "label"))
    data = load_text_task((a, b), "sentence1", "sentence2")
    cfg = TrainingConfig(epochs=6, batch_size=8, lr=5e-2, head_lr=5e-3, progress=False)
    res = train_classifier(_lora(), data, cfg, model=tiny_model)
    assert res.accuracy >= 0.85, res.accuracy
    alone = train_classifier(_lora(), load_text_task((a, b), "sentence1", ignore_text_pair=True), cfg,
                             model=tiny_model)
    assert alone.accuracy <= 0.7, alone.accuracy


# ----- regression --------------------------------------------------------------------------------------
def regression_rows(n: int, seed: int):
    """Score -1.5..2.7 from the sentiment word (plus a filler-dependent nudge): non-integer floats."""
    return [(text, (2.5 if label else -1.5) + 0.1 * (len(text) % 3)) for text, label in easy_rows(n, seed)]


def test_float_scores_are_detected_as_regression(tmp_path):
    path = write_csv(tmp_path / "stsb.csv", [("a", 3.8), ("b", 0.5), ("c", 5.0)], header=("sentence", "score"))
    data = load_text_task((path, path), "sentence", label_column="score")
    assert (data.task, data.num_labels) == ("regression", 1)
    assert data.train.features["label"].dtype == "float32"
    assert list(data.train["label"]) == pytest.approx([3.8, 0.5, 5.0])
    assert "regression" in data.describe()
    with pytest.raises(ValueError, match=r"--label-column.*3\.8.*--task regression"):
        load_text_task((path, path), "sentence", label_column="score", task="classification")
    assert detect_task([0, 1, 2.0]) == "classification" and detect_task([0, 1.5]) == "regression"
    assert detect_task(["a", 1.5]) == "classification"  # strings: never regression


@pytest.mark.parametrize("labels, pattern", [
    ([1.5, None], r"finite numbers for regression; row 1 holds None"),
    ([2.5, 2.5], r"every training label is 2\.5"),
    ([1.5, float("nan")], r"row 1 holds nan"),
])
def test_regression_label_errors(labels, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_text_task(_dd(text=["a", "b"], label=labels), task="regression")


def test_correlations_match_reference_values():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))
    assert average_ranks([10, 20, 20, 5]) == [2.0, 3.5, 3.5, 1.0]
    assert spearman([1, 2, 3, 4], [1, 4, 9, 100]) == pytest.approx(1.0)
    scipy_stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, generator=g).tolist(), torch.randn(50, generator=g).tolist()
    y = [a + b for a, b in zip(x, y)]
    y[3] = y[4]  # a tie
    assert pearson(x, y) == pytest.approx(scipy_stats.pearsonr(x, y)[0], abs=1e-9)
    assert spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y)[0], abs=1e-9)


def test_regression_training_reports_pearson_and_uses_mse(tiny_model, tmp_path):
    a = write_csv(tmp_path / "train.csv", regression_rows(96, 1))
    b = write_csv(tmp_path / "eval.csv", regression_rows(40, 2))
    data = load_text_task((a, b))
    assert data.task == "regression"
    res = train_classifier(_lora(), data, TrainingConfig(epochs=8, batch_size=8, lr=2e-2, head_lr=2e-2,
                                                         progress=False), model=tiny_model)
    assert res.task == "regression" and math.isnan(res.accuracy)
    assert res.pearson > 0.95 and res.spearman > 0.6, (res.pearson, res.spearman)
    model = res.peft_model.get_base_model()
    assert model.config.problem_type == "regression" and model.config.num_labels == 1
    # eval_loss is the mean squared error of the one-output head
    from peft_lowrank_ext.train.loop import predict_scores

    tok = load_model_and_tokenizer(str(tiny_model), 1)[1]
    preds = predict_scores(res.peft_model, tok, encode_rows(tok, data.eval, 64), 64)
    mse = sum((p - y) ** 2 for p, y in zip(preds, data.eval["label"])) / len(preds)
    assert res.eval_loss == pytest.approx(mse, rel=1e-5) and res.eval_loss < 0.5
    assert res.extra["task"] == "regression" and res.to_dict()["pearson"] == res.pearson


def test_head_size_must_fit_the_task(tiny_model):
    from peft_lowrank_ext.train.loop import fit

    data = load_text_task(_dd(text=["good", "bad", "nice"], label=[3.5, 0.5, 4.0]))
    peft_model, tok = wrap_classifier(_lora(), str(tiny_model), 2, 0)  # two outputs: wrong for regression
    with pytest.raises(ValueError, match=r"num_labels.*2 output\(s\), the regression data needs 1"):
        fit(peft_model, tok, data, TrainingConfig(max_steps=1, progress=False))


# ----- labels ------------------------------------------------------------------------------------------
def test_gapped_labels_are_refused_or_remapped():
    with pytest.raises(ValueError, match=r"--label-column.*2 classes \[0, 7\].*8 outputs.*--remap-labels"):
        load_text_task(_dd(text=["a", "b", "c"], label=[0, 7, 0]))
    data = load_text_task(_dd(text=["a", "b", "c"], label=[0, 7, 0]), remap_labels=True)
    assert data.num_labels == 2 and list(data.train["label"]) == [0, 1, 0] and data.label_map == {0: 0, 7: 1}
    strings = load_text_task(_dd(text=["a", "b", "c"], label=["neutral", "entailment", "neutral"]),
                             remap_labels=True)
    assert strings.label_map == {"entailment": 0, "neutral": 1} and list(strings.train["label"]) == [1, 0, 1]


def test_huge_label_ids_are_refused_cheaply():
    """0 and 10**12 must not build range(10**12 + 1) (that was a MemoryError)."""
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"2 classes \[0, 1000000000000\]"):
        load_text_task(_dd(text=["a", "b"], label=[0, 10**12]))
    assert time.perf_counter() - t0 < 5
    train = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})
    evald = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [1, 10**12]})
    with pytest.raises(ValueError, match=r"evaluation labels \[1000000000000\].*allowed: 0\.\.1"):
        load_text_task(datasets.DatasetDict(train=train, validation=evald))


def test_remapped_eval_labels_must_occur_in_training():
    train = datasets.Dataset.from_dict({"text": ["a", "b"], "label": ["pos", "neg"]})
    evald = datasets.Dataset.from_dict({"text": ["a", "b"], "label": ["pos", "meh"]})
    with pytest.raises(ValueError, match=r"evaluation labels \['meh'\] do not occur"):
        load_text_task(datasets.DatasetDict(train=train, validation=evald), remap_labels=True)


# ----- load_text_task sources --------------------------------------------------------------------------
def test_load_text_task_sources(tmp_path):
    path = write_csv(tmp_path / "d.csv", easy_rows(20))
    assert len(load_text_task(path).eval) == 4  # 20% held out
    assert len(load_text_task({"train": path, "validation": path}).eval) == 20
    assert len(load_text_task((path, path)).eval) == 20
    whole = datasets.Dataset.from_dict({"text": [t for t, _ in easy_rows(10)], "label": [y for _, y in easy_rows(10)]})
    assert (len(load_text_task(whole, eval_fraction=0.3).train), load_text_task(whole).task) == (7, "classification")
    with pytest.raises(ValueError, match=r"source: a dict needs the key 'train'"):
        load_text_task({"eval": path})
    with pytest.raises(ValueError, match=r"--split-eval.*'test' not found"):
        load_text_task(_dd(text=["a", "b"], label=[0, 1]), split_eval="test")
    with pytest.raises(ValueError, match=r"source: must be"):
        load_text_task(42)
