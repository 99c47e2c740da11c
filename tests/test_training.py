"""Bundled data, data loading and its errors, and the plain training loop.

Most tests use a tiny BERT (built from a config) and a word-level tokenizer saved to a temporary
folder, so they run offline in seconds; one short test trains the packaged real MiniLM.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest
import torch

import peft_lowrank_ext  # noqa: F401  (registers RLoRA with PEFT)
from peft_lowrank_ext.data import EVAL_CSV, TRAIN_CSV, make_dataset
from peft_lowrank_ext.train.data import FORMATS, load_table, load_text_classification
from peft_lowrank_ext.train.loop import linear_schedule, train_classifier
from peft_lowrank_ext.train.measure import count_parameters, optimizer_state_bytes
from peft_lowrank_ext.train.models import default_target_modules, load_model_and_tokenizer, packaged_model_path
from peft_lowrank_ext.train.run import TrainingConfig

# ----- helpers shared with test_cli.py ----------------------------------------------------------
EASY_POS = ["good", "great", "lovely", "superb", "nice"]
EASY_NEG = ["bad", "awful", "poor", "dull", "nasty"]
FILLER = ["the", "food", "film", "was", "really", "very", "and", "it"]


def easy_rows(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """Short texts whose label is given by which sentiment word they contain."""
    g = torch.Generator().manual_seed(seed)

    def pick(words):
        return words[int(torch.randint(len(words), (1,), generator=g))]

    rows = []
    for i in range(n):
        label = i % 2
        words = [pick(FILLER), pick(FILLER), pick(EASY_POS if label else EASY_NEG), pick(FILLER)]
        rows.append((" ".join(words), label))
    return rows


def write_csv(path: Path, rows, header=("text", "label")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def save_tiny_bert(folder: Path, num_labels: int = 2) -> Path:
    """Save a 2-layer, hidden-32 BERT classifier and a word-level tokenizer to ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    words = sorted({w for text in (EASY_POS, EASY_NEG, FILLER) for w in text})
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]")
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=32, num_labels=num_labels, pad_token_id=0))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def easy_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("easy-data")
    write_csv(d / "train.csv", easy_rows(96, seed=1))
    write_csv(d / "eval.csv", easy_rows(40, seed=2))
    return load_text_classification(d / "train.csv", d / "eval.csv")


def _lora(**kw):
    from peft import LoraConfig

    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], "task_type": "SEQ_CLS", **kw})


def _rlora(n, **kw):
    from peft_lowrank_ext import RLoraConfig

    return RLoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], "projection_ratio": 0.05,
                          "pac_bayes_weight": 1.0, "num_train_examples": n, "task_type": "SEQ_CLS", **kw})


# ----- bundled data ------------------------------------------------------------------------------
def test_bundled_csvs_match_the_generator():
    """The committed CSVs are exactly what make_dataset.py writes (no hand edits, deterministic)."""
    train_rows, eval_rows = make_dataset.build()
    for path, rows in ((TRAIN_CSV, train_rows), (EVAL_CSV, eval_rows)):
        with open(path, newline="", encoding="utf-8") as f:
            got = [(t, int(y)) for t, y in list(csv.reader(f))[1:]]
        assert got == rows, path


def test_bundled_data_shape_balance_and_split():
    data = load_text_classification()
    assert (len(data.train), len(data.eval), data.num_labels) == (800, 200, 2)
    assert data.train.column_names == ["text", "label"] == data.eval.column_names
    assert set(list(data.train["label"])) == {0, 1}
    assert sum(list(data.eval["label"])) == 100  # the evaluation split is exactly balanced
    assert 350 <= sum(list(data.train["label"])) <= 450
    assert not set(list(data.train["text"])) & set(list(data.eval["text"]))
    assert len(set(list(data.train["text"]))) == 800
    # the evaluation split uses adjectives never seen in training
    unseen = make_dataset.POS_ADJ[make_dataset.N_SHARED_ADJ:] + make_dataset.NEG_ADJ[make_dataset.N_SHARED_ADJ:]
    has_unseen = lambda texts: sum(any(re.search(rf"\b{w}\b", t.lower()) for w in unseen) for t in texts)  # noqa: E731
    assert has_unseen(list(data.train["text"])) == 0
    assert has_unseen(list(data.eval["text"])) >= 30


def test_bundled_data_contains_negations_and_contrasts():
    texts = [t.lower() for t in load_text_classification().train["text"]]
    assert sum(" not " in t or "n't" in t or "hardly" in t for t in texts) > 80
    assert sum(", but " in t or "although" in t for t in texts) > 80


# ----- loading local files -----------------------------------------------------------------------
@pytest.mark.parametrize("suffix", sorted(FORMATS))
def test_load_every_format_with_custom_columns(tmp_path, suffix):
    import pandas as pd

    rows = easy_rows(10)
    df = pd.DataFrame({"id": range(10), "review": [t for t, _ in rows], "stars": [y for _, y in rows]})
    path = tmp_path / f"data{suffix}"
    if suffix == ".csv":
        df.to_csv(path, index=False)
    elif suffix == ".tsv":
        df.to_csv(path, index=False, sep="\t")
    elif suffix == ".json":
        path.write_text(json.dumps(df.to_dict(orient="records")))
    elif suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    else:
        df.to_parquet(path)
    data = load_text_classification(path, path, text_column="review", label_column="stars")
    assert data.train.column_names == ["text", "label"]
    assert list(data.train["text"]) == [t for t, _ in rows]
    assert list(data.eval["label"]) == [y for _, y in rows]
    assert data.num_labels == 2


def test_train_file_alone_holds_out_a_seeded_fraction(tmp_path):
    rows = [(f"text number {i}", i % 2) for i in range(50)]
    path = write_csv(tmp_path / "all.csv", rows)
    a = load_text_classification(path, seed=3)
    b = load_text_classification(path, seed=3)
    c = load_text_classification(path, seed=4)
    assert (len(a.train), len(a.eval)) == (40, 10)
    assert sorted(list(a.train["text"]) + list(a.eval["text"])) == sorted(t for t, _ in rows)
    assert list(a.eval["text"]) == list(b.eval["text"]) != list(c.eval["text"])
    assert "held out 20%" in a.source


def test_max_samples_limits(tmp_path):
    data = load_text_classification(max_train_samples=30, max_eval_samples=7)
    assert (len(data.train), len(data.eval)) == (30, 7)


def test_float_labels_that_are_integers_are_accepted(tmp_path):
    path = write_csv(tmp_path / "f.csv", [("a good one", 1.0), ("a bad one", 0.0)])
    data = load_text_classification(path, path)
    assert list(data.train["label"]) == [1, 0]


def test_three_classes(tmp_path):
    path = write_csv(tmp_path / "three.csv", [("x", 0), ("y", 1), ("z", 2)])
    assert load_text_classification(path, path).num_labels == 3


@pytest.mark.parametrize(
    "rows, kwargs, pattern",
    [
        (None, {"train_file": "missing.csv"}, r"--train-file.*not found"),
        (None, {"train_file": "data.txt"}, r"--train-file.*unsupported.*\.csv.*\.parquet"),
        ([("a", 0), ("b", 1)], {"text_column": "review"}, r"--text-column.*'review'.*available.*\['text', 'label'\]"),
        ([("a", 0), ("b", 1)], {"label_column": "y"}, r"--label-column.*'y'"),
        ([("a", "pos"), ("b", "neg")], {}, r"--label-column.*integer.*'pos'"),
        ([("a", -1), ("b", 1)], {}, r"--label-column.*non-negative.*-1"),
        ([("a", 1.5), ("b", 1)], {}, r"--label-column.*1\.5"),
        ([("a", ""), ("b", 1)], {}, r"--label-column.*row 0 holds None"),
        ([("a", 1), ("b", 1)], {}, r"--label-column.*single class"),
        ([], {}, r"--train-file.*empty"),
        ([("a", 0), ("b", 1)], {"text_column": "label"}, r"must differ"),
    ],
)
def test_bad_input_raises_clear_value_error(tmp_path, rows, kwargs, pattern):
    kwargs = dict(kwargs)
    if rows is not None:
        kwargs["train_file"] = write_csv(tmp_path / "train.csv", rows)
        kwargs["eval_file"] = kwargs["train_file"]
    else:
        kwargs["train_file"] = tmp_path / kwargs["train_file"]
        if kwargs["train_file"].suffix == ".txt":
            kwargs["train_file"].write_text("text,label\na,0\n")
    with pytest.raises(ValueError, match=pattern):
        load_text_classification(**kwargs)


def test_eval_file_errors(tmp_path):
    train = write_csv(tmp_path / "train.csv", [("a", 0), ("b", 1)])
    with pytest.raises(ValueError, match=r"--eval-file.*not found"):
        load_text_classification(train, tmp_path / "nope.json")
    bad = write_csv(tmp_path / "eval.csv", [("c", 0), ("d", 5)])
    with pytest.raises(ValueError, match=r"evaluation labels \[5\].*allowed: 0\.\.1"):
        load_text_classification(train, bad)
    with pytest.raises(ValueError, match=r"--eval-file.*needs.*--train-file"):
        load_text_classification(eval_file=bad)
    with pytest.raises(ValueError, match=r"--max-train-samples"):
        load_text_classification(train, train, max_train_samples=0)


def test_text_must_be_strings(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": 3, "label": 0}\n{"text": "b", "label": 1}\n')
    with pytest.raises(ValueError, match=r"--text-column.*strings.*row 0"):
        load_text_classification(path, path)


def test_load_table_reports_parse_errors(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"--train-file.*could not read"):
        load_table(path)


# ----- training loop -----------------------------------------------------------------------------
def test_training_config_validation():
    for kwargs, name in [({"batch_size": 0}, "--batch-size"), ({"lr": -1.0}, "--lr"), ({"epochs": 0}, "--epochs"),
                         ({"max_steps": 0}, "--max-steps"), ({"head_lr": float("nan")}, "--head-lr"),
                         ({"warmup_ratio": 1.0}, "--warmup-ratio")]:
        with pytest.raises(ValueError, match=re.escape(name)):
            TrainingConfig(**kwargs)


def test_linear_schedule_warms_up_and_decays_to_zero():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = linear_schedule(opt, warmup_steps=2, total_steps=6)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[1] < lrs[2] == pytest.approx(1.0)
    assert lrs[2] > lrs[3] > lrs[4] > lrs[5] > 0
    assert opt.param_groups[0]["lr"] == 0.0


def test_lora_training_learns_and_reports_metrics(tiny_model, easy_data, tmp_path):
    cfg = TrainingConfig(epochs=6, batch_size=8, lr=5e-2, head_lr=5e-3, progress=False, seed=0)
    res = train_classifier(_lora(), easy_data, cfg, model=tiny_model, output_dir=tmp_path / "lora",
                           method="lora", evaluate_before=True)
    # the easy task is learned, from a chance-level start
    assert res.initial_accuracy < 0.7
    assert res.accuracy >= 0.85
    assert res.steps == 6 * math.ceil(96 / 8)
    assert res.epochs == pytest.approx(6.0)
    # LoRA A and B on query/value of 2 layers (hidden 32, r 4) + the classifier head (32·2 + 2)
    assert res.trainable_params == 2 * 2 * 4 * (32 + 32) + 32 * 2 + 2
    saved = tmp_path / "lora" / "adapter_model.safetensors"
    assert res.adapter_bytes == saved.stat().st_size
    assert res.adapter_bytes >= 4 * res.trainable_params  # fp32 tensors + header
    # AdamW: two fp32 moments per parameter plus a step counter per tensor
    assert 8 * res.trainable_params <= res.optimizer_state_bytes <= 8 * res.trainable_params + 64 * 20
    assert res.train_time_s > 0 and res.time_per_step_s == pytest.approx(res.train_time_s / res.steps)
    assert res.peak_rss_bytes is None or res.peak_rss_bytes > 50 * 2**20
    assert res.extra["target_modules"] == ["query", "value"]
    assert json.loads(json.dumps(res.to_dict()))["method"] == "lora"


def test_fit_changes_only_the_adapter_and_head(tiny_model, easy_data):
    from peft import get_peft_model

    from peft_lowrank_ext.train.loop import fit

    net, tok = load_model_and_tokenizer(tiny_model, 2)
    model = get_peft_model(net, _lora())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = fit(model, tok, easy_data, TrainingConfig(max_steps=5, lr=1e-2, progress=False), method="lora")
    assert res.adapter_dir is None and res.steps == 5
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "training did not change any parameter"
    assert all("lora_" in n or "modules_to_save" in n for n in changed), changed
    assert any("lora_B" in n for n in changed) and any("modules_to_save" in n for n in changed)


def test_training_is_deterministic_for_a_seed(tiny_model, easy_data):
    cfg = TrainingConfig(max_steps=8, batch_size=8, lr=5e-3, progress=False, seed=7)
    a = train_classifier(_lora(), easy_data, cfg, model=tiny_model)
    b = train_classifier(_lora(), easy_data, cfg, model=tiny_model)
    c = train_classifier(_lora(), easy_data, TrainingConfig(max_steps=8, batch_size=8, lr=5e-3, progress=False,
                                                             seed=8), model=tiny_model)
    assert (a.accuracy, a.eval_loss, a.final_train_loss) == (b.accuracy, b.eval_loss, b.final_train_loss)
    assert a.eval_loss != c.eval_loss


def test_rlora_training_learns_and_saves_only_z_and_head(tiny_model, easy_data, tmp_path):
    from safetensors import safe_open

    cfg = TrainingConfig(epochs=6, batch_size=8, lr=0.1, head_lr=0.02, progress=False)
    config = _rlora(len(easy_data.train), projection_ratio=0.25, pac_bayes_weight=0.0)
    res = train_classifier(config, easy_data, cfg, model=tiny_model, output_dir=tmp_path / "rlora", method="rlora")
    d_per_module = math.ceil(0.25 * 4 * (32 + 32))
    assert res.trainable_params == 4 * d_per_module + 32 * 2 + 2
    with safe_open(tmp_path / "rlora" / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
        saved = sum(f.get_tensor(k).numel() for k in keys)
    assert saved == res.trainable_params
    assert all("rlr_z" in k or "classifier" in k for k in keys), keys
    assert (res.lr, res.head_lr) == (0.1, 0.02)
    assert res.accuracy >= 0.85
    assert 8 * res.trainable_params <= res.optimizer_state_bytes <= 8 * res.trainable_params + 64 * 10
    assert "pac_bayes" not in res.extra
    lora = train_classifier(_lora(), easy_data, TrainingConfig(max_steps=1, progress=False), model=tiny_model)
    assert res.adapter_bytes < lora.adapter_bytes


def test_rlora_pac_bayes_term_acts_in_the_plain_loop(tiny_model, easy_data):
    """The regularizer (applied by RLoRA at each optimizer step) keeps z closer to the prior mean 0."""
    cfg = TrainingConfig(epochs=2, batch_size=8, lr=0.1, head_lr=0.02, progress=False)
    free = train_classifier(_rlora(96, projection_ratio=0.25, pac_bayes_weight=0.0), easy_data, cfg,
                            model=tiny_model)
    reg = train_classifier(_rlora(96, projection_ratio=0.25, pac_bayes_weight=1.0), easy_data, cfg,
                           model=tiny_model)
    assert reg.extra["adapter_param_norm"] < 0.8 * free.extra["adapter_param_norm"]
    pb = reg.extra["pac_bayes"]
    assert pb["kl"] > 0 and pb["regularizer"] == pytest.approx(pb["bound"])  # weight 1.0


def test_head_gets_its_own_learning_rate(tiny_model, easy_data):
    from peft import get_peft_model

    from peft_lowrank_ext.train.loop import head_and_adapter_groups

    net, _ = load_model_and_tokenizer(tiny_model, 2)
    model = get_peft_model(net, _lora())
    config = TrainingConfig(lr=1e-2, head_lr=1e-4)
    groups = head_and_adapter_groups(model, config.lr, config.head_lr)
    assert [g["lr"] for g in groups] == [1e-2, 1e-4]
    assert sum(p.numel() for p in groups[1]["params"]) == 32 * 2 + 2
    assert sum(p.numel() for g in groups for p in g["params"]) == count_parameters(model)[0]


def test_optimizer_state_bytes_counts_adam_moments():
    p = torch.nn.Parameter(torch.zeros(10))
    opt = torch.optim.AdamW([p])
    assert optimizer_state_bytes(opt) == 0
    p.grad = torch.ones(10)
    opt.step()
    assert optimizer_state_bytes(opt) == 2 * 10 * 4 + 4  # exp_avg, exp_avg_sq, step


def test_default_targets_and_bad_model_path(tiny_model, tmp_path):
    net, tok = load_model_and_tokenizer(tiny_model, 2)
    assert default_target_modules(net) == ["query", "value"]
    with pytest.raises(ValueError, match=r"--model.*cannot load"):
        load_model_and_tokenizer(tmp_path / "no-such-model", 2)


def test_tokenizer_without_pad_token_gets_one(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(FILLER + EASY_POS + EASY_NEG)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(tmp_path)
    LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, pad_token_id=None)).save_pretrained(tmp_path)
    data = load_text_classification(write_csv(tmp_path / "d.csv", easy_rows(12)), max_eval_samples=4)
    res = train_classifier(_lora(target_modules=None), data, TrainingConfig(max_steps=2, progress=False),
                           model=tmp_path)
    assert res.extra["target_modules"] == ["q_proj", "v_proj"]
    net, tok = load_model_and_tokenizer(tmp_path, 2)
    assert tok.pad_token == "</s>" and net.config.pad_token_id == vocab["</s>"]


def test_real_minilm_few_steps(tmp_path):
    """The packaged pretrained MiniLM trains with LoRA on the bundled data (8 steps)."""
    assert (packaged_model_path() / "model.safetensors").is_file()
    data = load_text_classification(max_train_samples=64, max_eval_samples=64)
    res = train_classifier(_lora(r=8, lora_alpha=16), data,
                           TrainingConfig(max_steps=8, batch_size=8, lr=2e-3, progress=False),
                           output_dir=tmp_path / "minilm", method="lora")
    # 6 layers × (query, value) × r·(384 + 384), plus the 384→2 head
    assert res.trainable_params == 6 * 2 * 8 * (384 + 384) + 384 * 2 + 2
    assert res.total_params > 22_000_000
    assert 0.0 <= res.accuracy <= 1.0 and math.isfinite(res.eval_loss)
    assert res.adapter_bytes > 4 * res.trainable_params
