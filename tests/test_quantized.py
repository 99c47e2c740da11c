"""QLoRA-style use of the four methods on bitsandbytes 8-bit and 4-bit base models.

A tiny Llama (hidden size 128: bitsandbytes' CPU kernels need it) built from a config is loaded
quantized with ``BitsAndBytesConfig`` and prepared with ``prepare_model_for_kbit_training``. For
each method and quantization it is wrapped, trained with torch AdamW, saved and reloaded, merged
and exported. Merging into a quantized base re-quantizes the weight, so merged logits are compared
with the error PEFT's own LoRA makes merging the *same* ΔW (our adapter exported to plain LoRA)
into the same quantized base; on top, the merged weights themselves must equal LoRA's.

On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit weight for its bf16 CPU kernel at the
first inference forward. The models here switch that off (``support_avx512bf16_for_cpu``), so the
numbers are the same on every CPU; merging a repacked weight has its own tests below.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.tuners_utils import BaseTunerLayer

bnb = pytest.importorskip("bitsandbytes")

from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

import peft_lowrank_ext  # noqa: E402,F401  (registers the methods with PEFT)
from peft_lowrank_ext import export_lora  # noqa: E402
from peft_lowrank_ext.tuners._base.layer import AdditiveAdapterLayer  # noqa: E402
from peft_lowrank_ext.tuners._base.quantized import dequantize  # noqa: E402
from methods import METHODS, lm_batches  # noqa: E402
from models import TINY_MODELS, VOCAB  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore:(Merging into|Unmerging from) a:UserWarning"),
    pytest.mark.filterwarnings("ignore:(Merge|Unmerge) lora module:UserWarning"),
    pytest.mark.filterwarnings("ignore:torch.utils.checkpoint. the use_reentrant parameter:UserWarning"),
]

QUANT = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "fp4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True,
                   bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
    "int8-fp16-weights": dict(load_in_8bit=True, llm_int8_has_fp16_weight=True),
}
LLAMA_TARGETS = TINY_MODELS["llama"].target_modules  # q_proj, v_proj, o_proj, down_proj
# Our merge error may exceed PEFT LoRA's by this factor plus this absolute slack.
ERROR_FACTOR, ERROR_SLACK = 1.5, 1e-3


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(1234)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)
    folder = tmp_path_factory.mktemp("tiny-llama-128")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def load_quantized(folder, quant: str, prepare: bool = True, **kwargs):
    model = LlamaForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(**QUANT[quant]),
                                             **kwargs)
    for module in model.modules():  # no CPU-specific repacking (see the module docstring)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return prepare_model_for_kbit_training(model) if prepare else model


def config_of(method: str):
    return METHODS[method].make_config(LLAMA_TARGETS, "CAUSAL_LM")


def inputs(seed: int = 0):
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs()).logits.float()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def own_layers(model) -> dict[str, AdditiveAdapterLayer]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, AdditiveAdapterLayer) and m.has_adapter("default")}


def quantized_bases(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}


def train(model, method: str, fused: bool, steps: int = 3) -> None:
    for callback in METHODS[method].trainer_callbacks():  # AutoLoRA's search: held-out batches
        callback.attach(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=fused)
    model.train()
    for step, batch in enumerate(lm_batches(steps, batch=4, seq=8)):
        model(**batch).loss.backward()
        if step == 0:  # the gradient reaches every switched-on adapter layer through the quantized bases
            for name, layer in own_layers(model).items():
                grads = [p.grad for p in layer.parameters() if p.requires_grad]
                if layer.adapter_is_on("default"):
                    assert any(g is not None and bool(g.abs().sum() > 0) for g in grads), f"no gradient in {name}"
        optimizer.step()
        optimizer.zero_grad()


def adapted_and_base(model) -> tuple[torch.Tensor, torch.Tensor, float]:
    adapted = logits(model)
    with model.disable_adapter():
        base = logits(model)
    return adapted, base, max_diff(adapted, base)


@pytest.mark.parametrize("quant", ["nf4", "fp4-dq", "int8"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_qlora_train_save_merge_export(method, quant, llama_dir, tmp_path):
    fused = quant != "nf4"  # every method trains once with the default AdamW and twice with fused=True
    model = get_peft_model(load_quantized(llama_dir, quant), config_of(method))
    assert len(quantized_bases(model)) == 14  # every linear layer of the two blocks
    layers = own_layers(model)
    assert {type(layer.get_base_layer()) for layer in layers.values()} == {
        bnb.nn.Linear8bitLt if quant == "int8" else bnb.nn.Linear4bit}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert before and all(METHODS[method].prefix in n for n in before)

    train(model, method, fused)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before), \
        "training must change the adapter"
    with torch.no_grad():
        deltas = [(layer, layer.get_delta_weight("default")) for layer in layers.values()]
    assert all(d.shape == (layer.out_features, layer.in_features) and d.dtype == torch.float32 for layer, d in deltas)
    assert sum(bool(d.abs().sum() > 0) for _, d in deltas) >= 4, "the adapter must be non-trivial"

    adapted = logits(model)
    model.save_pretrained(tmp_path / "ours")
    ours = PeftModel.from_pretrained(load_quantized(llama_dir, quant), tmp_path / "ours")
    assert max_diff(logits(ours), adapted) <= 1e-5, "save/load must reproduce the trained model"
    _, base, effect = adapted_and_base(ours)
    assert effect > 0.1

    export_lora(ours, tmp_path / "lora")
    lora = PeftModel.from_pretrained(load_quantized(llama_dir, quant), tmp_path / "lora")
    assert lora.peft_config["default"].peft_type.value == "LORA"
    lora_logits = logits(lora)
    assert max_diff(lora_logits, adapted) <= 1e-4, "the exported LoRA must give the trained logits"

    merged = ours.merge_and_unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    merged_logits = logits(merged)
    lora_merged = lora.merge_and_unload()
    ours_error, lora_error = max_diff(merged_logits, adapted), max_diff(logits(lora_merged), lora_logits)
    print(f"{method} {quant}: adapter effect {effect:.4f}, merge error ours {ours_error:.5f}, "
          f"PEFT LoRA {lora_error:.5f}")
    assert ours_error <= ERROR_FACTOR * lora_error + ERROR_SLACK
    # The adapter was not dropped: the merged model is far closer to the adapted model than to the base.
    assert max_diff(merged_logits, base) > 0.5 * effect and ours_error < 0.25 * effect

    # The merged weights are LoRA's merged weights: same ΔW, same dequantize-add-requantize.
    lora_bases = quantized_bases(lora_merged)
    for name, layer in quantized_bases(merged).items():
        assert type(layer) is type(lora_bases[name])
        torch.testing.assert_close(dequantize(layer), dequantize(lora_bases[name]), atol=1e-6, rtol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")
        if quant != "int8":  # the layer's quantization settings are kept
            state = layer.weight.quant_state
            assert (state.quant_type, state.blocksize, state.nested, state.dtype, layer.compute_dtype) == (
                QUANT[quant]["bnb_4bit_quant_type"], 64, quant == "fp4-dq", torch.float32, torch.float32)


# One method per quantization: the merge code is shared by all four (base_layer.py).
@pytest.mark.parametrize("quant, method", [("nf4", "prilora"), ("fp4-dq", "heterolora"), ("int8", "rlora"),
                                           ("int8-fp16-weights", "autolora")])
def test_merge_adapter_then_unmerge_adapter(quant, method, llama_dir):
    model = get_peft_model(load_quantized(llama_dir, quant), config_of(method))
    adapted, base, effect = adapted_and_base(model)
    layers = own_layers(model)
    weights = {n: dequantize(layer.get_base_layer()).clone() for n, layer in layers.items()}
    with torch.no_grad():
        deltas = {n: layer.get_delta_weight("default") for n, layer in layers.items()}

    model.merge_adapter()
    assert all(layer.merged for layer in layers.values())
    merged = logits(model)  # a merged layer runs only its (re-quantized) base layer
    merge_error = max_diff(merged, adapted)
    assert merge_error < 0.25 * effect and max_diff(merged, base) > 0.5 * effect
    if quant == "int8-fp16-weights":  # a float weight, quantized at every forward: the merge itself is exact
        for n, layer in layers.items():
            torch.testing.assert_close(layer.get_base_layer().weight.data, weights[n] + deltas[n], atol=1e-6, rtol=0)

    model.unmerge_adapter()
    assert not any(layer.merged for layer in layers.values())
    if quant == "int8-fp16-weights":
        for n, layer in layers.items():
            torch.testing.assert_close(layer.get_base_layer().weight.data, weights[n], atol=1e-6, rtol=0)
        assert max_diff(logits(model), adapted) <= 1e-5
    else:  # quantized twice more: back to the adapted model up to the merge error
        assert max_diff(logits(model), adapted) <= 2 * merge_error + ERROR_SLACK


def repack_for_cpu(layer) -> None:
    """What Linear4bit.forward does to its weight at inference on CPUs with AVX512-BF16."""
    weight = layer.weight
    weight.data, weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(weight.data, weight.quant_state)


needs_cpu_repacking = pytest.mark.skipif(not hasattr(bnb.functional, "_convert_weight_packed_for_cpu"),
                                         reason="this bitsandbytes never repacks 4-bit weights for the CPU")


@needs_cpu_repacking
@pytest.mark.parametrize("state_dict_first", [False, True], ids=["repacked", "repacked-then-state_dict"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["", "dq"])
def test_dequantize_reads_weights_repacked_for_cpu_inference(quant_type, nested, state_dict_first):
    layer = bnb.nn.Linear4bit(128, 256, bias=False, compute_dtype=torch.float32, quant_type=quant_type,
                              compress_statistics=nested)
    layer.load_state_dict(torch.nn.Linear(128, 256, bias=False).state_dict())
    layer = layer.to("cpu")
    expected = dequantize(layer).clone()
    repack_for_cpu(layer)
    if state_dict_first:  # bitsandbytes' own inverse; 0.50.2 leaves a plain weight's absmax transposed
        layer.state_dict()
    # Only the bf16 rounding of the block scales that the repacking did remains (2^-8 relative at most).
    assert max_diff(dequantize(layer), expected) <= 2 ** -8 * float(expected.abs().max())
    x = torch.randn(5, 128)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ expected.T, atol=1e-2 * float(x.abs().max()), rtol=0)


@needs_cpu_repacking
@pytest.mark.parametrize("quant", ["nf4", "fp4-dq"])
def test_merge_into_4bit_weights_repacked_for_cpu_inference(quant, llama_dir, tmp_path):
    reference = get_peft_model(load_quantized(llama_dir, quant), config_of("autolora"))
    reference.save_pretrained(tmp_path)
    model = PeftModel.from_pretrained(load_quantized(llama_dir, quant), tmp_path)
    adapted, base, effect = adapted_and_base(model)
    for name, layer in quantized_bases(model).items():
        repack_for_cpu(layer)
        if ".layers.1." in name:
            layer.state_dict()  # the state bitsandbytes' own inverse leaves behind
    model.merge_adapter()
    reference.merge_adapter()
    merged, expected = logits(model), logits(reference)
    # The repacking rounded the block scales to bf16, so a few values re-quantize to a neighbouring code;
    # reading the repacked bytes as standard ones (PEFT 0.21.2) is off by more than the adapter's effect.
    assert max_diff(merged, expected) <= 0.5 * max_diff(expected, adapted) + ERROR_SLACK
    assert max_diff(merged, base) > 0.5 * effect
    model.unmerge_adapter()
    assert max_diff(logits(model), adapted) <= 2 * max_diff(expected, adapted) + ERROR_SLACK


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_safe_merge_refuses_a_broken_adapter_and_leaves_the_weight(quant, llama_dir):
    model = get_peft_model(load_quantized(llama_dir, quant), config_of("autolora"))
    name, layer = next(iter(own_layers(model).items()))
    before = dequantize(layer.get_base_layer()).clone()
    with torch.no_grad():
        layer._store("A")["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        model.merge_adapter(safe_merge=True)
    assert not layer.merged
    assert torch.equal(dequantize(layer.get_base_layer()), before), name


@pytest.mark.parametrize("weight_dtype", [torch.float8_e4m3fn, torch.int8], ids=["float8", "int8-plain"])
def test_merge_into_an_unsupported_weight_raises_naming_the_layer(weight_dtype):
    case = TINY_MODELS["llama"]
    model = get_peft_model(case.build(), METHODS["prilora"].make_config(case.target_modules, case.task_type))
    layer = next(iter(own_layers(model).values()))
    base = layer.get_base_layer()
    base.weight = torch.nn.Parameter(base.weight.data.to(weight_dtype), requires_grad=False)
    stored = base.weight.data.clone()
    dtype_name = str(weight_dtype).removeprefix("torch.")
    with pytest.raises(TypeError, match=rf"base layer of type Linear .*dtype torch\.{dtype_name}"):
        model.merge_and_unload()
    assert not layer.merged and torch.equal(base.weight.data.view(torch.uint8), stored.view(torch.uint8))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_half_precision_quantized_inference_and_merge(method, llama_dir):
    """No kbit preparation: bf16 activations into a 4-bit base, fp16 into an 8-bit one; the adapter stays fp32."""
    for quant, dtype in (("nf4", torch.bfloat16), ("int8", torch.float16)):
        settings = {**QUANT[quant], **({"bnb_4bit_compute_dtype": dtype} if quant == "nf4" else {})}
        model = LlamaForCausalLM.from_pretrained(llama_dir, quantization_config=BitsAndBytesConfig(**settings),
                                                 dtype=dtype)
        model = get_peft_model(model, config_of(method))
        assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if METHODS[method].prefix in n)
        model.eval()
        with torch.no_grad():
            out = model(**inputs()).logits
        assert out.dtype == dtype and torch.isfinite(out).all()
        adapted, base, effect = adapted_and_base(model)
        assert effect > 0.1
        merged = model.merge_and_unload()
        assert max_diff(logits(merged), adapted) < 0.25 * effect
        if quant == "nf4":  # the quant state keeps the model's dtype (PEFT's LoRA merge turns it into fp32)
            for layer in quantized_bases(merged).values():
                assert layer.weight.quant_state.dtype == dtype and layer.compute_dtype == dtype


@pytest.mark.parametrize("method", ["rlora", "prilora"])
def test_training_after_an_inference_pass_keeps_every_gradient(method, llama_dir):
    """bitsandbytes repacks 4-bit weights at an inference pass on AVX512-BF16 CPUs, after which no gradient
    flows back through them; wrapping keeps the standard layout, so an evaluation changes no gradient."""

    def wrapped():
        torch.manual_seed(0)
        model = LlamaForCausalLM.from_pretrained(llama_dir, quantization_config=BitsAndBytesConfig(**QUANT["nf4"]))
        model = get_peft_model(prepare_model_for_kbit_training(model), config_of(method))
        assert all(not m.support_avx512bf16_for_cpu for m in quantized_bases(model).values())
        return model

    def adapter_grads(model):
        model.train()
        model(**lm_batches(1, batch=4, seq=8)[0]).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}

    evaluated = wrapped()
    logits(evaluated)  # an inference pass: eval mode, no grad
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                   for m in quantized_bases(evaluated).values())
    expected, got = adapter_grads(wrapped()), adapter_grads(evaluated)
    assert expected.keys() == got.keys() and len(got) > 0
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)
