"""QLoRA with this package: a 4-bit base model, one of our methods, TRL ``SFTTrainer``.

What it shows:

1. The base model loaded in 4 bits (``BitsAndBytesConfig``: NF4 with double quantization, the
   QLoRA recipe) and fine-tuned by ``SFTTrainer(peft_config=<our config>)``, which prepares the
   quantized model for training (``prepare_model_for_kbit_training``) and wraps it, as for LoRA.
   Only the adapter trains; the 4-bit weights stay frozen.
2. ``save_pretrained`` and ``PeftModel.from_pretrained`` on a freshly loaded 4-bit base give the
   trained model's logits.
3. The three ways to deploy the adapter, each checked:

   * ``export_lora``: a plain PEFT LoRA adapter for the same 4-bit base, with the same logits;
   * ``merge_and_unload`` into the *full-precision* base: exact (the QLoRA way to ship a model);
   * ``merge_and_unload`` into the *4-bit* base: dequantize, add ΔW, quantize again — as PEFT's
     LoRA does. Not exact: the script prints how far the merged model is from the adapted one,
     next to how much the adapter changes the base model at all.

bitsandbytes runs on CUDA and, since 0.48, on CPU. The script exits with status 1 when a check fails.

Full size (a GPU is advised; one epoch on the 800 bundled review texts)::

    python examples/qlora_sft.py --model Qwen/Qwen2.5-0.5B --method prilora

Smoke test (the tests build a tiny Llama with hidden size 128 — bitsandbytes' 4-bit kernels need
more than 32 — and its tokenizer in a temporary folder)::

    python examples/qlora_sft.py --model TINY_DIR --max-steps 2 --max-train-samples 12
"""

from __future__ import annotations

import argparse
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl import SFTConfig, SFTTrainer

from peft_lowrank_ext import export_lora
from peft_lowrank_ext.train.models import default_target_modules
from example_utils import output_folder, quiet_hf_logging, require_same_logits
from sft_causal_lm import DEFAULT_LR, load_texts, peft_config_for, sft_parser, summary

# AutoLoRA's search needs held-out rows and a callback: see sft_causal_lm.py, which shows it.
METHODS = ("rlora", "prilora", "heterolora")


def parse_args(argv=None) -> argparse.Namespace:
    return sft_parser(__doc__.split("\n\n")[0], METHODS, "prilora",
                      "where the adapters go (default: a temporary folder)").parse_args(argv)


def four_bit(model_id: str, compute_dtype: torch.dtype):
    """The base model with every linear layer of the blocks in NF4 + double quantization (QLoRA)."""
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=compute_dtype)
    device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else None
    model = AutoModelForCausalLM.from_pretrained(model_id, quantization_config=config, dtype=compute_dtype,
                                                 device_map=device_map)
    # On AVX512-BF16 CPUs bitsandbytes would switch a 4-bit layer to its bf16 kernel at the first inference
    # pass (other numbers, and no gradient through it afterwards). This package's adapters keep the standard
    # path; do the same for the plain-PEFT comparison below. No effect on a GPU.
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    model.eval()
    device = next(model.parameters()).device
    return model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()


def main(argv=None) -> None:
    args = parse_args(argv)
    quiet_hf_logging()
    torch.manual_seed(args.seed)
    gpu = torch.cuda.is_available()
    compute_dtype = torch.bfloat16 if gpu and torch.cuda.is_bf16_supported() else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = four_bit(args.model, compute_dtype)
    targets = args.target_modules or default_target_modules(model)
    texts = load_texts(args)
    config = peft_config_for(args.method, args, targets, len(texts))
    print(f"model: {args.model} in 4 bits (nf4, double quant, compute {compute_dtype}); method: {args.method}; "
          f"targets: {targets}; {len(texts)} training rows")

    with output_folder(args.output_dir) as out:
        sft_args = SFTConfig(output_dir=str(out / "trainer"), max_length=args.max_length, dataset_text_field="text",
                             num_train_epochs=args.epochs, max_steps=args.max_steps or -1,
                             per_device_train_batch_size=args.batch_size,
                             learning_rate=args.lr or DEFAULT_LR[args.method], logging_steps=10, save_strategy="no",
                             report_to="none", seed=args.seed, dataloader_num_workers=0,
                             bf16=compute_dtype == torch.bfloat16)
        trainer = SFTTrainer(model=model, args=sft_args, train_dataset=texts, processing_class=tokenizer,
                             peft_config=config)
        peft_model = trainer.model
        result = trainer.train()
        print(f"train loss: {result.training_loss:.4f} after {result.global_step} steps")
        print(summary(args.method, peft_model))
        # TRL keeps a quantized model's trainable weights in bf16; this package's adapters are fp32.
        for param in peft_model.parameters():
            if param.requires_grad:
                param.data = param.data.float()

        batch = tokenizer(list(texts["text"][:4]), truncation=True, max_length=args.max_length, padding=True,
                          return_tensors="pt")
        trained = logits(peft_model, batch)
        adapter_dir = out / f"{args.method}-adapter"
        peft_model.save_pretrained(adapter_dir)
        print(f"saved adapter: {adapter_dir}")

        reloaded = PeftModel.from_pretrained(four_bit(args.model, compute_dtype), adapter_dir)
        adapted = logits(reloaded, batch)
        require_same_logits(trained, adapted, "PeftModel.from_pretrained on a fresh 4-bit base reproduces the "
                            "trained model", atol=1e-4)

        # 1. A plain LoRA adapter for the same 4-bit base (serves without this package).
        lora_dir = out / f"{args.method}-as-lora"
        export_lora(reloaded, lora_dir)
        lora = PeftModel.from_pretrained(four_bit(args.model, compute_dtype), lora_dir)
        require_same_logits(adapted, logits(lora, batch), "export_lora: plain PEFT LoRA on the 4-bit base gives "
                            "the same logits", atol=1e-4)
        del lora

        # 2. Merged into the full-precision base: exact.
        full = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(args.model, dtype=compute_dtype),
                                         adapter_dir)
        full_adapted = logits(full, batch)
        require_same_logits(full_adapted, logits(full.merge_and_unload(), batch),
                            "merge_and_unload into the full-precision base is exact", atol=1e-4)
        del full

        # 3. Merged into the 4-bit base: re-quantized, so only close.
        with reloaded.disable_adapter():
            base = logits(reloaded, batch)
        merged = logits(reloaded.merge_and_unload(), batch)
        effect = float((adapted - base).abs().max())
        error = float((merged - adapted).abs().max())
        print(f"merge into the 4-bit base: max |logit difference| to the adapted model {error:.4g}; "
              f"the adapter itself changes the base model's logits by up to {effect:.4g}")
        if error > 0.5 * effect:
            print("note: the re-quantization error is as large as the adapter's effect; deploy with export_lora "
                  "or merge into the full-precision base instead")


if __name__ == "__main__":
    sys.exit(main())
