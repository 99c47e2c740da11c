"""Triton launchers for the Fastfood projection: two fused Hadamard transforms per direction.

Forward ``θ = c · [H · diag(g) · Π · H · diag(b) · pad(z)][:out_dim]``:
  1. ``u = H(b ⊙ pad(z))`` — padding and sign flip fused into the first load;
  2. ``θ = (H(c · g ⊙ u[perm]))[:out_dim]`` — gather, Gaussian scaling and normalisation fused into
     the load, truncation into the store.
Backward (the transpose chain): ``s[perm] = g ⊙ H(c · pad(dθ))``, then ``dz = (b ⊙ H s)[:d]``.
Every row of a launch is one module, so all modules sharing ``L`` are transformed together.
"""

from __future__ import annotations

import torch

from ._triton_hadamard import Fusion, hadamard_transform


def fastfood_forward_triton(z: torch.Tensor, signs: torch.Tensor, perm: torch.Tensor,
                            gauss: torch.Tensor, row_scale: torch.Tensor, out_dim: int) -> torch.Tensor:
    """(M, out_dim) fp32 projection of z (M, d); factors (M, L) contiguous, row_scale (M,) fp32."""
    rows, length = signs.shape
    u = torch.empty(rows, length, device=z.device, dtype=torch.float32)
    hadamard_transform(z, u, rows, length, in_cols=z.shape[1], fusion=Fusion(in_mul=signs), workspace=u)
    out = torch.empty(rows, out_dim, device=z.device, dtype=torch.float32)
    fusion = Fusion(gather=perm, in_mul=gauss, row_scale=row_scale)
    return hadamard_transform(u, out, rows, length, out_cols=out_dim, fusion=fusion)


def fastfood_backward_triton(grad: torch.Tensor, signs: torch.Tensor, perm: torch.Tensor,
                             gauss: torch.Tensor, row_scale: torch.Tensor, d: int) -> torch.Tensor:
    """(M, d) fp32 gradient for z from the (M, out_dim) gradient of the projection."""
    rows, length = signs.shape
    s = torch.empty(rows, length, device=grad.device, dtype=torch.float32)
    fusion = Fusion(row_scale=row_scale, out_mul=gauss, scatter=perm)
    hadamard_transform(grad, s, rows, length, in_cols=grad.shape[1], fusion=fusion)
    grad_z = torch.empty(rows, d, device=grad.device, dtype=torch.float32)
    return hadamard_transform(s, grad_z, rows, length, out_cols=d, fusion=Fusion(out_mul=signs), workspace=s)
