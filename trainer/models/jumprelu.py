"""JumpReLU levels for the Tree HSAE (arXiv 2602.11881 trains every level as a JumpReLU SAE).

z = JumpReLU_θ(W_enc (x − b_dec) + b_enc) = pre · H(pre − θ) with one threshold θ_i ≥ 0 per latent;
x̂ = W_dec z + b_dec, unit-norm decoder rows. The threshold learns through the straight-through estimators of
Rajamanoharan et al. 2024 (rectangle kernel of bandwidth ε): sae-lens's `JumpReLU` and `Step` autograd
functions, used as they are (DeepMind's variant: the estimators reach θ only, not the encoder):

  ∂z_i/∂θ_i = −(θ_i/ε)·K((pre_i − θ_i)/ε),   ∂H(pre_i − θ_i)/∂θ_i = −(1/ε)·K((pre_i − θ_i)/ε),

K(u) = 1 on |u| < ½. Each level adds λ_l·L0_l, L0_l = mean over tokens of Σ_i H(pre_i − θ_i), and λ_l is not
learnt but steered (the paper's adaptive sparsity coefficient): after every training step
  ema ← β·ema + (1 − β)·L0_l(batch),   λ_l ← λ_l + η·(ema/(1 − βⁿ) − target_l),
so λ rises while the level fires more than its target and falls while it fires less (η = 0.001, β = 0.999 in
the paper). The paper prints Δλ ∝ −η(L0 − target); only the sign used here steers L0 to the target. λ is not
clamped at 0: a negative λ rewards firing, which is what raises a level that fires below its target (with a
clamp, the finest level of the synthetic tree of the tests stayed 18% under its target with λ = 0).

The controller is integral only and the thresholds move about one learning rate per Adam step, so L0 hunts
around its target for a while: on the tests' synthetic tree (3 levels, 64-row batches, lr 3e-3) every level
is within 20% of its target after 500 steps from twice the target, not yet after 250.

Thresholds start from data (`fit_thresholds`): each latent's θ is the quantile of its pre-activations over the
normalisation sample above which a fraction target/width of the tokens lie, so the level starts near its
target L0 and λ only has to hold it there. With a random start (θ = a small constant, as sae-lens), θ moves
by about one learning rate per Adam step, which short runs cannot afford.

A code slot is active iff its value > 0 (θ ≥ 0, kept so after each step). A level's code has as many slots
as the busiest token of the batch needs (K varies from batch to batch; `base.pad_codes` joins batches).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from trainer.models.base import SaeLensLevel
from trainer.models.topk import TopKLevel

_QUANTILE_LATENTS = 1024  # latents per block when fitting thresholds (a [B, block] sort at a time)


@functools.cache
def _sae_lens_functions():
    """sae-lens's (JumpReLU, Step) autograd functions, imported on first use: importing sae-lens takes
    seconds, which every `hsae` command would otherwise pay."""
    from sae_lens.saes.jumprelu_sae import JumpReLU, Step

    return JumpReLU, Step


class JumpReLULevel(TopKLevel):
    """One JumpReLU SAE over normalised inputs, steered to `target_l0` active latents per token."""

    def __init__(self, d_in: int, width: int, target_l0: float, bandwidth: float, lambda_init: float = 0.0):
        super().__init__(d_in, width, k=width)
        self.target_l0, self.bandwidth = float(target_l0), float(bandwidth)
        self.threshold_F = nn.Parameter(torch.zeros(width))
        self.register_buffer("l0_lambda", torch.tensor(float(lambda_init)))
        self.register_buffer("l0_ema", torch.zeros(()))
        self.register_buffer("l0_ema_steps", torch.zeros((), dtype=torch.long))

    def activations(self, pre_BF: Tensor) -> Tensor:
        """Dense z [B, F] = pre · H(pre − θ), with the straight-through gradient to θ."""
        jump_relu = _sae_lens_functions()[0]
        return jump_relu.apply(pre_BF, self.threshold_F.to(pre_BF.dtype), self.bandwidth, False)

    def encode(self, x_BD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(values_BK, indices_BK with -1 for silent slots, pre_BF); K = the most latents any token of the
        batch has active (at least 1). Gradients reach W_enc, b_enc and θ through `values_BK`."""
        pre_BF = self.pre_acts(x_BD)
        z_BF = self.activations(pre_BF)
        k = max(1, int((z_BF > 0).sum(-1).max())) if z_BF.numel() else 1
        values_BK, indices_BK = z_BF.topk(min(k, self.width), dim=-1, sorted=False)
        return values_BK, torch.where(values_BK > 0, indices_BK, -1), pre_BF

    def l0_penalty(self, pre_BF: Tensor) -> Tensor:
        """Mean over tokens of Σ_i H(pre_i − θ_i), straight-through to θ (the term λ multiplies)."""
        step = _sae_lens_functions()[1]
        return step.apply(pre_BF, self.threshold_F.to(pre_BF.dtype), self.bandwidth, False).sum(-1).mean()

    @torch.no_grad()
    def adapt_lambda(self, l0: Tensor, rate: float, ema: float) -> None:
        """One step of the controller (see the module docstring); `l0` is the batch's mean active count."""
        self.l0_ema.mul_(ema).add_((1 - ema) * l0.float())
        self.l0_ema_steps += 1
        smoothed = self.l0_ema / (1 - ema ** self.l0_ema_steps.float())
        self.l0_lambda.add_(rate * (smoothed - self.target_l0))

    @torch.no_grad()
    def fit_thresholds(self, x_BD: Tensor, latents_F: Tensor | None = None) -> None:
        """θ_i = the (1 − target/width) quantile of latent i's pre-activations over `x_BD`, at least 0, for
        every latent or only those selected by bool `latents_F`."""
        pre_BF = self.pre_acts(x_BD).float()
        selected = torch.arange(self.width, device=pre_BF.device)
        if latents_F is not None:
            selected = selected[latents_F]
        rate = min(1.0, self.target_l0 / self.width)
        rank = min(len(pre_BF) - 1, max(0, round((1 - rate) * len(pre_BF))))
        for start in range(0, len(selected), _QUANTILE_LATENTS):
            block = selected[start : start + _QUANTILE_LATENTS]
            theta = pre_BF[:, block].sort(0).values[rank].clamp_min(0)
            self.threshold_F[block] = theta.to(self.threshold_F.dtype)

    @torch.no_grad()
    def clamp_thresholds(self) -> None:
        self.threshold_F.clamp_(min=0)

    def saelens_export(self, input_scale: float) -> SaeLensLevel:
        """As TopK's, plus θ, which the constant input scale leaves unchanged (pre-activations are equal)."""
        export = super().saelens_export(input_scale)
        export.k = None
        export.threshold_F = self.threshold_F.detach().clone()
        return export

