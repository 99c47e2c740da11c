"""What the benchmark scripts share: where results go, the provenance record (machine, versions,
date, load), memory readers, size formatting and Llama stacks built from a config.

Scripts run as ``python bench/<name>.py`` start with a three-line shim that puts the repository root
(not bench/, where a file named like an installed package would shadow it) first on ``sys.path``,
so that ``bench.common`` and an uninstalled checkout's ``peft_lowrank_ext`` import.
"""

from __future__ import annotations

import os
import platform
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from peft_lowrank_ext.cli.report import human_bytes  # noqa: F401  (one size formatter for the CLI and bench)
from peft_lowrank_ext.train.measure import peak_rss_bytes, reset_peak_rss, rss_bytes  # noqa: F401

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"


def offline(hub: bool = True) -> None:
    """Default the Hugging Face libraries to offline (``hub=False``: the hub may be reached for data)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1" if hub else "0")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ----- provenance -----------------------------------------------------------------------------------
def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux/macOS
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    """Python and the library versions a number depends on."""
    import peft
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "peft": peft.__version__,
            "transformers": transformers.__version__}


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """Where the numbers came from: host, CPU, threads, accelerator and library versions."""
    import torch

    info = {"hostname": socket.gethostname(), "platform": platform.platform(), "machine": platform.machine(),
            "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "torch_threads": threads if threads is not None else torch.get_num_threads(),
            **versions(), "device": "cpu", "gpu": None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ----- models ---------------------------------------------------------------------------------------
def build_llama(dtype=None, **config_kwargs):
    """``(LlamaForCausalLM, config)`` with cheap random weights (N(0, 0.02²), norms at 1), built on the meta
    device and materialised on the CPU: the values do not matter for cost, and no full init runs."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    dtype = dtype or torch.float32
    config = LlamaConfig(**config_kwargs)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(dtype)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.model.rotary_emb = LlamaRotaryEmbedding(config)  # non-persistent buffers were left empty by to_empty
    return model, config


def machine_brief() -> dict[str, Any]:
    """The short machine record of the per-method benches: platform, Python, torch, threads, cores, device."""
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "device": "cuda" if torch.cuda.is_available() else "cpu"}


def method_bench_parser(description: str, script: str, *, rounds: int, threads_help: str):
    """The options the per-method benches (heterolora.py, prilora.py) share; ``script`` is their ``__file__``
    (the JSON goes next to it by default)."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--steps-per-round", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=32, help="the bundled reviews are at most 25 tokens long")
    parser.add_argument("--threads", type=int, default=1, help=threads_help)
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--out", default=str(Path(script).with_suffix(".json")))
    return parser


def interleaved_step_times(models: dict[str, Any], inputs: dict[str, Any], rounds: int, steps_per_round: int,
                           warmup: int = 2, lr: float = 1e-3) -> dict[str, list[float]]:
    """Wall times of full training steps (forward, backward, AdamW step with hooks) of several models on one
    batch, interleaved in ``rounds`` of ``steps_per_round`` steps each so that load changes hit all alike."""
    import time

    import torch

    optims = {}
    for name, model in models.items():
        model.train()
        optims[name] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def step(name: str) -> float:
        t0 = time.perf_counter()
        models[name](**inputs).loss.backward()
        optims[name].step()
        optims[name].zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for name in models:
        for _ in range(warmup):
            step(name)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name in models:
            times[name].extend(step(name) for _ in range(steps_per_round))
    return times
