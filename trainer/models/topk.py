"""Flat TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"), also each level of `tree`.

z = TopK(ReLU(W_enc (x − b_dec) + b_enc)), x̂ = W_dec z + b_dec, unit-norm decoder rows, tied init, and the
AuxK loss: the top-k_aux *dead* latents reconstruct the residual x − x̂ (coefficient 1/32), which keeps
latents from dying.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trainer.config import ArchConfig
from trainer.models.base import HSAE, LevelCode, SaeLensLevel, StepOutput, sparse_decode, topk_relu, unit_rows
from trainer.models.registry import register


class TopKLevel(nn.Module):
    """One ordinary TopK SAE over normalised inputs."""

    def __init__(self, d_in: int, width: int, k: int, floored: bool = False):
        super().__init__()
        self.width, self.k, self.floored = width, k, floored
        if floored:  # `min_activation`: set from data by the tree (`fit_floors`), 0 until then
            self.register_buffer("floor", torch.zeros(()))
        W_dec_FD = unit_rows(torch.randn(width, d_in))
        self.W_dec_FD = nn.Parameter(W_dec_FD)
        self.W_enc_DF = nn.Parameter(W_dec_FD.T.clone())  # tied init (Gao et al.)
        self.b_enc_F = nn.Parameter(torch.zeros(width))
        self.b_dec_D = nn.Parameter(torch.zeros(d_in))

    def pre_acts(self, x_BD: Tensor) -> Tensor:
        return (x_BD - self.b_dec_D) @ self.W_enc_DF + self.b_enc_F

    def encode(self, x_BD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(values_BK, indices_BK with -1 for silent slots, pre_BF)."""
        pre_BF = self.pre_acts(x_BD)
        values_BK, indices_BK = topk_relu(pre_BF, self.k)
        if self.floored:  # weak picks of a token with fewer than k features stay silent
            on_BK = values_BK >= self.floor
            values_BK, indices_BK = torch.where(on_BK, values_BK, 0), torch.where(on_BK, indices_BK, -1)
        return values_BK, indices_BK, pre_BF

    def decode(self, indices_BK: Tensor, values_BK: Tensor) -> Tensor:
        return sparse_decode(self.W_dec_FD, indices_BK, values_BK) + self.b_dec_D

    def aux_loss(self, pre_BF: Tensor, dead_F: Tensor | None, residual_BD: Tensor, aux_k: int) -> Tensor:
        """AuxK: ‖e − ê‖² with e = x − x̂ (no gradient) and ê decoded from the top aux_k dead latents."""
        if dead_F is None or not bool(dead_F.any()):
            return pre_BF.new_zeros(())
        k_aux = min(aux_k, int(dead_F.sum()))
        values_BK, indices_BK = topk_relu(pre_BF.masked_fill(~dead_F, float("-inf")), k_aux)
        e_hat_BD = sparse_decode(self.W_dec_FD, indices_BK, values_BK)
        return (residual_BD.detach() - e_hat_BD).pow(2).sum(-1).mean()

    def saelens_export(self, input_scale: float) -> SaeLensLevel:
        """Folds x_n = c·x_raw exactly: W_enc' = c·W_enc, b_dec' = b_dec / c, W_dec' = W_dec / c."""
        c = float(input_scale)
        return SaeLensLevel(
            W_enc_DF=self.W_enc_DF.detach() * c,
            b_enc_F=self.b_enc_F.detach().clone(),
            W_dec_FD=self.W_dec_FD.detach() / c,
            b_dec_D=self.b_dec_D.detach() / c,
            k=self.k,
            min_activation=float(self.floor) if self.floored else 0.0,
        )


@register("topk")
class TopKSAE(HSAE):
    """One level; `width` latents, `k` active per token."""

    def __init__(self, cfg: ArchConfig, d_in: int):
        super().__init__(cfg, d_in)
        self.sae = TopKLevel(d_in, cfg.width, cfg.k)
        self.aux_k = cfg.resolved_aux_k(d_in)

    @property
    def level_widths(self) -> list[int]:
        return [self.sae.width]

    @property
    def level_k(self) -> list[int]:
        return [self.sae.k]

    @torch.no_grad()
    def init_from_data(self, sample_BD: Tensor) -> None:
        self.sae.b_dec_D.copy_(sample_BD.mean(0))

    def encode(self, x_raw_BD: Tensor) -> list[LevelCode]:
        values_BK, indices_BK, _ = self.sae.encode(self.normalize(x_raw_BD)[0])
        return [LevelCode(indices_BK, values_BK)]

    def decode(self, codes: list[LevelCode], level: int | None = None) -> Tensor:
        return self.sae.decode(codes[0].indices, codes[0].values)

    def loss(self, x_raw_BD: Tensor, step: int, dead: list[Tensor] | None = None) -> StepOutput:
        x_BD, _ = self.normalize(x_raw_BD)
        values_BK, indices_BK, pre_BF = self.sae.encode(x_BD)
        x_hat_BD = self.sae.decode(indices_BK, values_BK)
        recon = (x_BD - x_hat_BD).pow(2).sum(-1).mean()
        aux = self.sae.aux_loss(pre_BF, dead[0] if dead else None, x_BD - x_hat_BD, self.aux_k)
        loss = recon + self.cfg.aux_coef * aux
        logs = {"recon": recon.detach(), "aux": aux.detach()}
        return StepOutput(loss, logs, [LevelCode(indices_BK, values_BK)], x_BD, x_hat_BD)

    def decoder_directions(self, level: int) -> Tensor:
        return unit_rows(self.sae.W_dec_FD.detach())

    def unit_norm_params(self) -> list[tuple[nn.Parameter, int]]:
        return [(self.sae.W_dec_FD, -1)]

    def saelens_export(self, level: int) -> SaeLensLevel | None:
        return self.sae.saelens_export(float(self.input_scale))
