"""RLoRA's PAC-Bayes regularizer, applied at every optimizer step whatever the training loop.

Posterior ``Q = N(z, σ_q² I)``, prior ``P = N(0, σ_p² I)`` over the concatenated ``z`` of all
modules of one adapter:
``KL = ½ Σ_m [d_m σ_q,m²/σ_p² + ‖z_m‖²/σ_p² − d_m + d_m ln(σ_p²/σ_q,m²)]``;
regularizer ``w · sqrt((KL + ln(2√n/δ)) / 2n)`` (McAllester) or ``w · KL / n`` (linear).

Why an optimizer pre-step hook (``step_hooks``) instead of a loss term: TRL's ``SFTTrainer`` (and
any loop that computes its own loss) ignores loss terms a tuner adds in ``forward``. The hook adds
``∇R`` to the gradients of ``z`` (and of ``log σ_q``) of every registered RLoRA model whose
parameters the stepping optimizer holds — once per optimizer step, i.e. after gradient
accumulation and after gradient clipping, under a plain loop, ``Trainer`` and ``SFTTrainer`` alike.

Clipping the sum [ours]: as the hook runs after the trainer's clipping, ``∇R`` itself would never be
clipped. With ``pac_bayes_max_grad_norm`` (default 1.0, Trainer's default ``max_grad_norm``) the hook
then clips the combined gradient of all the model's trainable parameters to that norm, exactly as
``torch.nn.utils.clip_grad_norm_`` does: ``g ← g · min(1, c / (‖g‖ + 1e-6))`` with
``g = clip_trainer(g_task) + ∇R``. ``None`` keeps the unclipped addition. (A loss term would be clipped
by the trainer, but its weight per micro-batch depends on how the loop scales and normalises the loss
under gradient accumulation, and SFTTrainer may not use it; the hook is exact in every loop.)
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

from ...runtime.distributed import fsdp1_whole
from ...runtime.step_hooks import register_step_callbacks
from .layer import RLoraLayer

# Values of the regularizer at the latest optimizer step, per (id(model), adapter), for logging.
LAST_VALUES: dict[tuple[int, str], dict[str, float]] = {}


def _layers(model: torch.nn.Module, adapter_name: str) -> Iterator[RLoraLayer]:
    for module in model.modules():
        if isinstance(module, RLoraLayer) and adapter_name in module.rlr_z:
            yield module


def _adapter_config(model: torch.nn.Module, adapter_name: str):
    for layer in _layers(model, adapter_name):
        return layer.rlr_config[adapter_name]
    raise ValueError(f"adapter_name={adapter_name!r} is not allowed; the model has no RLoRA layers for it")


def _adapter_names(model: torch.nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for module in model.modules():
        if isinstance(module, RLoraLayer):
            names.update(dict.fromkeys(module.rlr_z.keys()))
    return list(names)


def pac_bayes_terms(model: torch.nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """KL, bound and weighted regularizer of one adapter, as differentiable tensors."""
    config = _adapter_config(model, adapter_name)
    if config.num_train_examples is None:
        raise ValueError(
            f"RLoraConfig.num_train_examples=None is not allowed for the PAC-Bayes bound of adapter {adapter_name!r}; "
            "set it to the training-set size."
        )
    prior_var = config.prior_sigma**2
    kl = 0.0
    for layer in _layers(model, adapter_name):
        z = layer.rlr_z[adapter_name]
        d = z.numel()
        sigma = layer.posterior_sigma(adapter_name)
        post_var = sigma**2 if torch.is_tensor(sigma) else torch.tensor(sigma**2, device=z.device)
        kl = kl + 0.5 * (
            d * post_var / prior_var + z.float().pow(2).sum() / prior_var - d + d * torch.log(prior_var / post_var)
        )
    n = config.num_train_examples
    if config.pac_bayes_bound == "mcallester":
        bound = torch.sqrt((kl + math.log(2 * math.sqrt(n) / config.pac_bayes_delta)) / (2 * n))
    else:
        bound = kl / n
    return {"kl": kl, "bound": bound, "regularizer": config.pac_bayes_weight * bound}


def pac_bayes_stats(model: torch.nn.Module, adapter_name: str | None = None) -> dict[str, float]:
    """Current KL / bound / regularizer of an RLoRA model (PeftModel or plain model), as floats for logging."""
    names = _adapter_names(model)
    adapter_name = adapter_name or (names[0] if names else "default")
    with torch.no_grad():
        return {k: float(v) for k, v in pac_bayes_terms(model, adapter_name).items()}


def register_model(model: torch.nn.Module) -> None:
    """Make ``model``'s regularizer apply at every optimizer step that updates its parameters.

    Registers the adapted model itself (not the tuner), so adapters injected by transformers'
    ``load_adapter`` are covered too.
    """
    register_step_callbacks(model, "rlora_pac_bayes", pre=_apply_regularizer_gradients)


def _apply_regularizer_gradients(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Add the regulariser's gradient to every trainable z / log σ_q, once per training step.

    ``step_hooks`` runs this at the first optimizer of the step, before any optimizer of the step
    updates, so parameters split over several optimizers all receive it exactly once. Then, with
    ``pac_bayes_max_grad_norm``, the combined gradient of the model's trainable parameters is clipped.
    Under FSDP1, where each rank holds a flat slice of every parameter and gradient outside forward, this
    runs on the whole tensors (``summon_full_params`` with gradients, written back to the local shards).
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    with fsdp1_whole(model, trainable, writeback=True, with_grads=True):
        _add_regularizer_gradients(model)


def _add_regularizer_gradients(model: torch.nn.Module) -> None:
    norms: list[float] = []
    for adapter_name in _adapter_names(model):
        if not _adapter_config(model, adapter_name).pac_bayes_enabled:
            continue
        params = [
            p
            for layer in _layers(model, adapter_name)
            for store in (layer.rlr_z, layer.rlr_log_sigma)
            if adapter_name in store
            for p in [store[adapter_name]]
            if p.requires_grad
        ]
        if not params:
            continue
        with torch.enable_grad():
            terms = pac_bayes_terms(model, adapter_name)
            grads = torch.autograd.grad(terms["regularizer"], params, allow_unused=True)
        for p, g in zip(params, grads):
            if g is None:
                continue
            if getattr(g, "placements", None) is not None and g.placements != p.placements:
                g = g.redistribute(p.device_mesh, p.placements)  # FSDP2: σ_q's gradient comes back replicated
            if p.grad is None:
                p.grad = g.detach().to(p.dtype)
            else:
                p.grad.add_(g.to(p.grad.dtype))
        LAST_VALUES[(id(model), adapter_name)] = {k: float(v.detach()) for k, v in terms.items()}
        max_norm = _adapter_config(model, adapter_name).pac_bayes_max_grad_norm
        if max_norm is not None:
            norms.append(max_norm)
    if norms:
        trainable = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
        torch.nn.utils.clip_grad_norm_(trainable, min(norms))
