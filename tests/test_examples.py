"""Every script in ``examples/`` runs end to end at tiny size, offline, as a user would start it.

Each example is a subprocess (``python examples/NAME.py --tiny-options``) with ``HF_HUB_OFFLINE=1``
and ``TRANSFORMERS_OFFLINE=1``. The scripts assert their own round trips (reload / export / serve
give the trained logits) and exit non-zero otherwise, so exit status 0 plus the ``OK:`` lines
checked here mean those checks passed; the numbers they print (ranks, sparsity, allocations) are
parsed and checked against the configuration.

The examples are started together when the first test of this file needs them, two at a time
(most of each run is Python start-up and imports, which two cores run side by side), and each
test waits for its own.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TINY = ["--max-steps", "2", "--max-train-samples", "8", "--max-eval-samples", "8", "--batch-size", "4",
        "--max-length", "16"]
TIMEOUT_S = 900


def example_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", WANDB_DISABLED="true")
    # The package as an installed user has it (the checkout may not be pip-installed here).
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def run_example(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=ROOT, env=example_env(), text=True,
                          capture_output=True, timeout=TIMEOUT_S)


def build_tiny_causal_lm(folder: Path, hidden_size: int = 32) -> Path:
    """A 2-layer Llama and a word-level tokenizer trained on the bundled texts, saved like a hub checkpoint.

    bitsandbytes' 4-bit kernels need a hidden size above 32; the QLoRA example gets 128.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from peft_lowrank_ext.train.data import load_text_classification

    texts = list(load_text_classification().train["text"])
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.save_pretrained(folder)
    config = LlamaConfig(hidden_size=hidden_size, intermediate_size=hidden_size * 3 // 2, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(fast), max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


# name -> (script, arguments); "{tmp}", "{tiny_lm}" and "{tiny_lm128}" are filled in when the runs start.
RUNS = {
    "rlora": ("rlora_classification.py", TINY),
    "autolora": ("autolora_search_retrain.py", TINY + ["--hypergradient", "first_order", "--r", "4"]),
    "prilora": ("prilora_classification.py", TINY + ["--max-steps", "3", "--prune-every", "1", "--prune-end", "2"]),
    "heterolora": ("heterolora_classification.py", TINY + ["--proxy-batches", "1", "--realloc-every", "1",
                                                            "--shortcuts", "residual_1"]),
    "sft_autolora": ("sft_causal_lm.py", ["--model", "{tiny_lm}", "--method", "autolora", "--max-steps", "2",
                                          "--max-train-samples", "12", "--batch-size", "4", "--max-length", "24",
                                          "--r", "4"]),
    "sft_qlora": ("qlora_sft.py", ["--model", "{tiny_lm128}", "--method", "prilora", "--max-steps", "2",
                                   "--max-train-samples", "12", "--batch-size", "4", "--max-length", "24", "--r", "4"]),
    "hub_local": ("hub_roundtrip.py", ["--local-hub", "{tmp}/hub", "--method", "rlora"] + TINY),
    "hub_offline": ("hub_roundtrip.py", ["--repo-id", "nobody/peft-lowrank-ext-example"] + TINY),
    "export_serve": ("export_and_serve.py", TINY + ["--serve-texts", "6"]),
}
# test name -> the runs it needs (only the runs of the selected tests are started)
NEEDS = {
    "test_rlora_example": ["rlora"], "test_autolora_example": ["autolora"], "test_prilora_example": ["prilora"],
    "test_heterolora_example": ["heterolora"], "test_sft_example": ["sft_autolora"],
    "test_qlora_example": ["sft_qlora"],
    "test_hub_roundtrip_local": ["hub_local"], "test_hub_roundtrip_offline_fails_clearly": ["hub_offline"],
    "test_export_and_serve": ["export_serve"],
}


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """Start the selected examples two at a time; map run name -> future of its CompletedProcess."""
    tmp = tmp_path_factory.mktemp("examples")
    wanted = [run for item in request.session.items if item.module is request.module
              for run in NEEDS.get(item.originalname, [])]
    pool = ThreadPoolExecutor(max_workers=2)
    futures = {}
    for name in sorted(set(wanted), key=lambda n: n.startswith("sft")):  # the tiny LM is built while others run
        script, args = RUNS[name]
        fill = {"tmp": str(tmp)}
        if "{tiny_lm}" in " ".join(args):
            fill["tiny_lm"] = str(build_tiny_causal_lm(tmp / "tiny-llama"))
        if "{tiny_lm128}" in " ".join(args):
            fill["tiny_lm128"] = str(build_tiny_causal_lm(tmp / "tiny-llama-128", hidden_size=128))
        futures[name] = pool.submit(run_example, script, *[a.format(**fill) for a in args])
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def finished(runs, name: str) -> str:
    """Stdout of a run that must have succeeded (its stderr tail is shown otherwise)."""
    done = runs[name].result()
    assert done.returncode == 0, f"{name} exited with {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    assert "MISMATCH" not in done.stdout + done.stderr
    return done.stdout


def number(pattern: str, text: str) -> float:
    found = re.search(pattern, text)
    assert found, f"no line matching {pattern!r} in:\n{text}"
    return float(found.group(1))


def test_rlora_example(runs):
    out = finished(runs, "rlora")
    assert "OK: PeftModel.from_pretrained reproduces the trained model" in out
    trainable = number(r"trainable params: (\d+) of", out)
    assert 0 < trainable < 10_000  # z per module (~5% of LoRA's factors) plus the 770-number head
    assert 0.0 <= number(r"accuracy: ([\d.]+) on 8 evaluation rows", out) <= 1.0
    assert number(r"regularizer=([\d.eE+-]+)", out) > 0  # the PAC-Bayes term was on
    assert number(r"\((\d+) bytes\)", out) > 0


def test_autolora_example(runs):
    out = finished(runs, "autolora")
    ranks = [int(r) for r in re.findall(r"^\s+rank\s+(\d+)\s+\S+", out, flags=re.M)]
    assert len(ranks) == 12  # query and value in MiniLM's six blocks
    assert all(1 <= r <= 4 for r in ranks), ranks
    assert "OK: the retrained LoRA has the 12 ranks the search found" in out
    assert number(r"mean rank: ([\d.]+) of 4", out) == pytest.approx(sum(ranks) / 12, abs=0.006)


def test_prilora_example(runs):
    out = finished(runs, "prilora")
    ranks = re.findall(r"^\s+rank\s+(\d+)\s+bert\.encoder\.layer\.(\d+)\.", out, flags=re.M)
    by_block = {int(block): int(r) for r, block in ranks}
    assert by_block == {0: 4, 1: 6, 2: 7, 3: 9, 4: 10, 5: 12}  # round(4 + 8 l / 5)
    sparsity = [float(s) for s in re.findall(r"^\s+sparsity ([\d.]+)\s", out, flags=re.M)]
    assert len(sparsity) == 12 and all(s == pytest.approx(0.5) for s in sparsity)
    steps = [int(s) for s in re.findall(r"^step\s+(\d+): sparsity of A mean", out, flags=re.M)]
    assert steps[:2] == [1, 2]  # the sparsity grew during training, logged as it changed
    assert "OK: every module reached the final sparsity 0.5" in out


def test_heterolora_example(runs):
    out = finished(runs, "heterolora")
    # 4 target modules x 6 blocks + one residual_1 shortcut per block = 30 candidates, budget 0.25 -> 8 on
    k = max(1, math.floor(0.25 * 30 + 0.5))
    for mode in ("static", "dynamic"):
        assert f"OK: [{mode}] exactly {k} of 30 candidates on in every allocation" in out
    static, dynamic = out.split("[dynamic] allocation")
    assert len(re.findall(r"^\s+ON\s", static, flags=re.M)) == k
    assert len(re.findall(r"^\s+ON\s", dynamic, flags=re.M)) == k
    assert "residual_1" in out
    assert len(re.findall(r"history: allocation", static)) == 1  # static: allocated once
    assert len(re.findall(r"history: allocation", dynamic)) == 2  # dynamic: re-allocated after each step


def test_sft_example(runs):
    out = finished(runs, "sft_autolora")
    assert "method: autolora" in out and "9 training rows" in out  # 12 rows, a quarter held out for beta
    ranks = [int(r) for r in re.search(r"autolora ranks: \[([\d, ]+)\]", out).group(1).split(",")]
    assert len(ranks) == 4 and all(1 <= r <= 4 for r in ranks)  # q_proj, v_proj in 2 blocks
    assert "after 2 steps" in out
    assert "OK: AutoPeftModelForCausalLM.from_pretrained reproduces the trained model" in out


def test_qlora_example(runs):
    out = finished(runs, "sft_qlora")
    assert "in 4 bits (nf4, double quant" in out and "method: prilora" in out and "after 2 steps" in out
    for check in ("PeftModel.from_pretrained on a fresh 4-bit base reproduces the trained model",
                  "export_lora: plain PEFT LoRA on the 4-bit base gives the same logits",
                  "merge_and_unload into the full-precision base is exact"):
        assert f"OK: {check}" in out
    error = number(r"merge into the 4-bit base: max \|logit difference\| to the adapted model ([\d.eE+-]+)", out)
    effect = number(r"changes the base model's logits by up to ([\d.eE+-]+)", out)
    assert effect > 0 and 0 < error < 1.0  # re-quantized: close, never bit-identical, never a crash


def test_hub_roundtrip_local(runs):
    out = finished(runs, "hub_local")
    assert "published to local hub folder" in out
    assert "'README.md', 'adapter_config.json', 'adapter_model.safetensors'" in out  # what push_to_hub uploads
    assert "loaded back: RLoraConfig" in out
    assert "OK: PeftModel.from_pretrained(" in out


def test_hub_roundtrip_offline_fails_clearly(runs):
    done = runs["hub_offline"].result()
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert "--repo-id nobody/peft-lowrank-ext-example" in done.stderr
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in done.stderr and "--local-hub" in done.stderr
    assert "accuracy:" not in done.stdout  # it stopped before training


def test_export_and_serve(runs):
    out = finished(runs, "export_serve")
    # The default export is the uniform layout: one r, the largest of PRILoRA's per-block ranks (compact layout).
    assert "exported plain LoRA (layout uniform)" in out and ": r=12, lora_alpha=12," in out
    assert "per-module ranks kept (layout compact): ranks used [4, 6, 7, 9, 10, 12]" in out
    assert "OK: the uniform export's r=12 is the largest kept rank, without rank/alpha patterns" in out
    assert "loaded LoraConfig from" in out  # the serving process saw a plain LoRA adapter
    served = re.findall(r"^\s*LABEL_[01] \(", out, flags=re.M)
    assert len(served) == 6
    assert "OK: plain PEFT serves the exported adapter with the trained adapter's logits" in out
    assert "OK: the pipeline's 6 labels are the argmax" in out
