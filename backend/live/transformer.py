"""The real live model: a run's language model, stopped after its layer, and its HSAE, on CUDA when
available. Imported only when a live request first needs a model (backend.live.model.load_model)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from backend.live.errors import LiveUnavailable
from backend.live.model import Continuation, LevelCodes, LiveRunSpec, PromptToken, SteerOutput, SteerTerm
from trainer.errors import HSAEError
from trainer.outliers import encode_inliers, inliers


class TransformerLiveModel:
    """A run's language model (stopped after its layer) and its HSAE, on CUDA when available."""

    def __init__(self, lm: Any, hsae: Any, max_norm: float = math.inf):
        self.lm, self.hsae = lm, hsae
        self.max_norm = max_norm  # massive activations get no features, as in training and indexing
        self.device = str(lm.device)
        tokenizer = lm.tokenizer
        self.bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.special = set(tokenizer.all_special_ids)
        self._directions: dict[int, torch.Tensor] = {}
        self.parents = [
            None if level == 0 else _as_numpy(hsae.parent_of(level))
            for level in range(len(hsae.level_widths))
        ]

    @classmethod
    def load(cls, spec: LiveRunSpec, device: str, cpu_threads: int | None = None) -> TransformerLiveModel:
        """`cpu_threads`: torch's threads (for the whole process) when the device is the CPU; None leaves
        torch's default. `hsae serve` passes all cores but one: the web server and the database need a core
        too, and torch's threads wait for each other by spinning, so on a busy 2-core machine two of them
        made a forward pass 60 times slower than one."""
        from trainer import checkpoint
        from trainer.lm import load_language_model, resolve_device

        if not spec.checkpoint_path:
            raise LiveUnavailable(
                f"run {spec.name!r} has no checkpoint path: re-index it to enable live prompts"
            )
        try:
            dev = resolve_device(device)
            if dev.type == "cpu" and cpu_threads:
                torch.set_num_threads(cpu_threads)
            ckpt = checkpoint.open(spec.checkpoint_path, device=dev)  # first: it fails fast when missing
            changed = ckpt.digest != spec.checkpoint_digest
            if not changed:
                lm = load_language_model(spec.model_name, spec.layer, str(dev))
        except HSAEError as err:
            raise LiveUnavailable(f"cannot load run {spec.name!r} for live prompts: {err}") from None
        if changed:
            raise LiveUnavailable(
                f"the checkpoint at {spec.checkpoint_path} changed since run {spec.name!r} was indexed "
                "(its weights digest differs): re-index it"
            )
        if ckpt.model.d_in != lm.d_model:
            raise LiveUnavailable(
                f"run {spec.name!r}: the checkpoint expects width {ckpt.model.d_in}, "
                f"the model gives {lm.d_model}"
            )
        return cls(lm, ckpt.model, ckpt.max_norm)

    def tokenize(self, text: str) -> list[PromptToken]:
        encoded = self.lm.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return [
            PromptToken(int(token), int(start), int(end))
            for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)
            if token not in self.special
        ]

    @torch.inference_mode()
    def encode(self, prompts: list[list[int]]) -> list[list[LevelCodes]]:
        T = 1 + max(len(p) for p in prompts)
        ids_BT = torch.zeros(len(prompts), T, dtype=torch.long)
        mask_BT = torch.zeros(len(prompts), T, dtype=torch.long)
        for b, prompt in enumerate(prompts):
            ids_BT[b, : 1 + len(prompt)] = torch.tensor([self.bos, *prompt])
            mask_BT[b, : 1 + len(prompt)] = 1
        resid_BTD = self.lm.residual(ids_BT, mask_BT)
        data_BT = mask_BT.bool()
        data_BT[:, 0] = False
        codes, _ = encode_inliers(self.hsae, resid_BTD[data_BT.to(resid_BTD.device)].float(), self.max_norm)
        per_level = [(c.indices.cpu().numpy(), c.values.float().cpu().numpy()) for c in codes]
        out, start = [], 0
        for prompt in prompts:
            stop = start + len(prompt)
            out.append([LevelCodes(indices[start:stop], values[start:stop]) for indices, values in per_level])
            start = stop
        return out


    def direction(self, level: int, index: int) -> torch.Tensor:
        """A feature's unit decoder direction [D] (float32), each level's directions computed once."""
        if level not in self._directions:
            self._directions[level] = self.hsae.decoder_directions(level).float()
        return self._directions[level][index]

    @torch.inference_mode()
    def steer(self, prompt: list[int], terms: list[SteerTerm], max_new_tokens: int) -> SteerOutput:
        """Greedy generation of a batch of two copies of the prompt; on the first, every position's output
        of the hooked layer gets each term's decoder direction times its coefficient, taken back from the
        HSAE's normalised space to the residual stream's (the inverse of the HSAE's input normalisation
        of that token: a feature at activation a adds a · direction / scale, as its decoder would).
        Positions with massive activations (the BOS attention sink) get nothing, as no feature is ever
        active on them. The second copy is the unsteered continuation; with all coefficients 0 the two
        are identical."""
        device = self.lm.device
        vector_D = torch.zeros(self.hsae.d_in, dtype=torch.float32, device=device)
        for term in terms:
            vector_D += term.coefficient * self.direction(term.level, term.index).to(device)
        rows_B11 = torch.tensor([1.0, 0.0], device=device).view(2, 1, 1)

        def add(_module, _inputs, output):
            hidden_BTD = output[0] if isinstance(output, tuple) else output
            flat_ND = hidden_BTD.reshape(-1, hidden_BTD.shape[-1]).float()
            _, scale_N1 = self.hsae.normalize(flat_ND)
            push_ND = (vector_D / scale_N1) * inliers(flat_ND, self.max_norm).unsqueeze(-1)
            push_BTD = push_ND.view(hidden_BTD.shape) * rows_B11
            new = (hidden_BTD.float() + push_BTD).to(hidden_BTD.dtype)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        ids_BT = torch.tensor([[self.bos, *prompt]] * 2, device=device)
        tokenizer = self.lm.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        handle = self.lm.block.register_forward_hook(add)
        try:
            out_BT = self.lm.model.generate(
                input_ids=ids_BT,
                attention_mask=torch.ones_like(ids_BT),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad,
                temperature=None,
                top_p=None,
                top_k=None,
            )
        finally:
            handle.remove()
        steered, unsteered = (out_BT[b, ids_BT.shape[1] :].tolist() for b in range(2))
        return SteerOutput(self._continuation(steered), self._continuation(unsteered))

    def _continuation(self, ids: list[int]) -> Continuation:
        """The generated ids up to the first end-of-text token (a row that ended first is padded after it)."""
        ends = self.lm.model.generation_config.eos_token_id
        ends = set(ends if isinstance(ends, list) else [] if ends is None else [ends])
        stop = next((i for i, token in enumerate(ids) if token in ends), len(ids))
        ids = ids[:stop]
        return Continuation(self.lm.tokenizer.decode(ids), ids)


def _as_numpy(tensor: torch.Tensor | None) -> np.ndarray | None:
    return None if tensor is None else tensor.detach().cpu().numpy().astype(np.int64)
