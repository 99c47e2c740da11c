"""``describe_adapter`` reads a saved adapter without its base model and agrees with the live model."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import LoraConfig, get_peft_model

from methods import METHODS, lm_batches, train_steps
from models import TINY_MODELS
from peft_lowrank_ext import AutoLoraSearch, HeteroLoraConfig, PriLoraConfig, autolora_select, export_lora
from peft_lowrank_ext.cli.adapter_info import AdapterInfo, describe_adapter, format_adapter_info
from peft_lowrank_ext.tuners.heterolora.layer import HeteroLoraLayer, HeteroShortcut
from peft_lowrank_ext.train.ranks import module_ranks

GPT2 = TINY_MODELS["gpt2"]
NOT_ON_DISK = "nowhere/not-a-real-base-model"  # describe_adapter must never try to load it


def wrap(method: str):
    targets, task = list(GPT2.target_modules), GPT2.task_type
    if method == "lora":
        config = LoraConfig(r=3, target_modules=targets, task_type=task)
    elif method == "heterolora_shortcuts":
        config = HeteroLoraConfig(r=4, target_modules=targets, task_type=task, shortcuts=["residual_1"],
                                  shortcut_r=2, budget=0.5, proxy="grad_norm", proxy_batches=1, init_weights=False)
    else:
        config = METHODS[method].make_config(GPT2.target_modules, task)
        if method == "autolora":  # the cheaper β step: the ranks, not the hypergradient, matter here
            config.hypergradient = "first_order"
    model = get_peft_model(GPT2.build(), config)
    model.peft_config["default"].base_model_name_or_path = NOT_ON_DISK
    if method == "autolora":
        AutoLoraSearch(lm_batches(n=1, batch=2, seq=6)).attach(model)
    return model




def export_succeeds(model, path) -> bool:
    try:
        export_lora(model, path)
    except ValueError:
        return False
    return True


def check_against_live_model(model, info: AdapterInfo, folder, tmp_path) -> None:
    assert info.ranks() == module_ranks(model)
    assert info.num_parameters == model.get_nb_trainable_parameters()[0]
    assert info.file_bytes == os.path.getsize(folder / "adapter_model.safetensors")
    assert info.exportable == export_succeeds(model, tmp_path / "exported")
    assert info.base_model == NOT_ON_DISK and info.task_type == "CAUSAL_LM"
    assert json.loads(json.dumps(info.to_dict())) == info.to_dict()


@pytest.mark.parametrize("method", ["lora", "rlora", "autolora", "prilora", "heterolora"])
def test_describe_matches_the_live_model_and_export(method, tmp_path):
    model = wrap(method)
    if method != "lora":
        train_steps(model)
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    info = describe_adapter(folder)
    assert info.method == method and info.peft_type == method.upper()
    check_against_live_model(model, info, folder, tmp_path)
    assert info.exportable == (method != "lora")
    assert sum(m["parameters"] for m in info.modules.values()) == info.num_parameters  # no head here
    if method == "rlora":
        z_sizes = {n: m.rlr_z["default"].numel() for n, m in model.base_model.model.named_modules()
                   if hasattr(m, "rlr_z")}
        assert {n: m["intrinsic_dim"] for n, m in info.modules.items()} == z_sizes
        assert {m["r"] for m in info.modules.values()} == {4}
    if method == "prilora":  # pruning ran: some entries of A are masked
        assert all(0 < m["sparsity"] < 1 for m in info.modules.values())
    if method == "heterolora":
        assert sorted(m["on"] for m in info.modules.values()) == [False] * 3 + [True] * 3
        assert "3 switched-on" in info.export_note
    text = format_adapter_info(info)
    assert f"method:       {method}" in text and NOT_ON_DISK in text
    assert all(name in text for name in info.modules)
    assert ("exportable:   yes" if info.exportable else "exportable:   no") in text


def test_autolora_search_and_selected_phases(tmp_path):
    model = wrap("autolora")
    first = model.base_model.model.get_submodule("transformer.h.0.attn.c_attn")
    first._store("beta")["default"].copy_(torch.tensor([6.0, 0.0, 0.0, 0.0]))
    model.save_pretrained(tmp_path / "search")
    search = describe_adapter(tmp_path / "search")
    assert search.modules["transformer.h.0.attn.c_attn"]["rank"] == 1
    assert search.modules["transformer.h.0.attn.c_attn"]["active_ranks"] == 4
    assert "search phase" in search.export_note
    check_against_live_model(model, search, tmp_path / "search", tmp_path / "a")
    autolora_select(model)
    model.save_pretrained(tmp_path / "selected")
    selected = describe_adapter(tmp_path / "selected")
    assert selected.ranks() == search.ranks()
    assert "search phase" not in selected.export_note
    check_against_live_model(model, selected, tmp_path / "selected", tmp_path / "b")


def test_heterolora_shortcuts_decide_exportability(tmp_path):
    model = wrap("heterolora_shortcuts")
    root = model.base_model.model
    shortcuts = [m for m in root.modules() if isinstance(m, HeteroShortcut)]
    for layer in shortcuts:
        layer.set_on("default", False)
    model.save_pretrained(tmp_path / "off")
    off = describe_adapter(tmp_path / "off")
    assert off.modules["transformer.h.1.hetero_residual_1"] == {
        "rank": 0, "max_rank": 2, "on": False, "shortcut": "residual_1", "parameters": 2 * 2 * 32}
    check_against_live_model(model, off, tmp_path / "off", tmp_path / "a")
    assert off.exportable

    shortcuts[1].set_on("default", True)
    model.save_pretrained(tmp_path / "on")
    on = describe_adapter(tmp_path / "on")
    assert not on.exportable and "transformer.h.1.hetero_residual_1" in on.export_note
    check_against_live_model(model, on, tmp_path / "on", tmp_path / "b")

    for layer in root.modules():
        if isinstance(layer, HeteroLoraLayer):
            layer.set_on("default", False)
    model.save_pretrained(tmp_path / "none")
    none = describe_adapter(tmp_path / "none")
    assert not none.exportable and "every module is switched off" in none.export_note
    check_against_live_model(model, none, tmp_path / "none", tmp_path / "c")


def test_classifier_head_is_counted_as_other_parameters(tmp_path):
    bert = TINY_MODELS["bert"]
    config = PriLoraConfig(r_first=2, r_last=3, target_modules=list(bert.target_modules), task_type=bert.task_type)
    model = get_peft_model(bert.build(), config)
    model.save_pretrained(tmp_path / "cls")
    info = describe_adapter(tmp_path / "cls")
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n)
    assert head > 0 and info.other_parameters == head
    assert info.num_parameters == model.get_nb_trainable_parameters()[0]
    assert info.ranks() == module_ranks(model) == {
        "bert.encoder.layer.0.attention.self.query": 2, "bert.encoder.layer.0.attention.self.value": 2,
        "bert.encoder.layer.1.attention.self.query": 3, "bert.encoder.layer.1.attention.self.value": 3}
    assert info.task_type == "SEQ_CLS" and "adapter +" in format_adapter_info(info)
    assert info.exportable == export_succeeds(model, tmp_path / "exported")


def test_modules_are_listed_in_block_order(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    base = GPT2LMHeadModel(GPT2Config(n_layer=11, n_embd=8, n_head=2, vocab_size=16, n_positions=8))
    model = get_peft_model(base, LoraConfig(r=1, target_modules=["c_attn"]))
    model.save_pretrained(tmp_path / "deep")
    info = describe_adapter(tmp_path / "deep")
    assert list(info.modules) == list(module_ranks(model))  # h.2 before h.10, although the file sorts by text
    assert list(info.modules)[-1] == "transformer.h.10.attn.c_attn"


def test_bad_folders_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        describe_adapter(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        describe_adapter(empty)

    model = wrap("prilora")
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    with pytest.raises(ValueError, match="is a file"):
        describe_adapter(folder / "adapter_config.json")
    weights = folder / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="adapter_model.safetensors is not a readable"):
        describe_adapter(folder)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors not found"):
        describe_adapter(folder)
    weights.write_bytes(data)
    assert describe_adapter(folder).method == "prilora"

    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json is not valid JSON"):
        describe_adapter(folder)
    config_file.write_text(json.dumps({k: v for k, v in config.items() if k != "peft_type"}))
    with pytest.raises(ValueError, match="peft_type=None"):
        describe_adapter(folder)
