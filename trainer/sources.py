"""Where a command's activations come from: a corpus run through a language model (cached), or a matrix
file."""

from __future__ import annotations

from dataclasses import dataclass

from trainer.activations import DEFAULT_CONTEXT_LEN, ActivationCache, ShardSource, load_activation_file
from trainer.data import ActivationSource, TensorSource
from trainer.errors import HSAEError
from trainer.lm import DEFAULT_LAYER, DEFAULT_MODEL, LanguageModel, load_language_model

DEFAULT_TOKENS = 200_000


@dataclass
class DataSpec:
    """The data flags shared by train, eval, encode and index (Contract 1)."""

    model: str = DEFAULT_MODEL
    """Hugging Face causal LM name or local path; default: the bundled offline SmolLM2-135M."""
    layer: int = DEFAULT_LAYER
    """Block whose residual-stream output is captured (0-based)."""
    corpus: str | None = None
    """demo, a .txt file, a folder, a .jsonl with a text field, or hf:NAME[:split]."""
    activations: str | None = None
    """A float [N, d] matrix (.npy or .safetensors tensor `activations`); no language model is run."""
    tokens: int | None = DEFAULT_TOKENS
    """How many tokens of activations to draw from the corpus, or rows to read from the file; None: all."""
    context_len: int = DEFAULT_CONTEXT_LEN
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.corpus is not None and self.activations is not None:
            raise HSAEError("give either --corpus or --activations, not both")
        if self.tokens is not None and self.tokens < 1:
            raise HSAEError(f"--tokens must be positive, got {self.tokens}")
        if self.context_len < 2:
            raise HSAEError(f"context length must be at least 2, got {self.context_len}")


@dataclass
class OpenedData:
    source: ActivationSource
    lm: LanguageModel | None
    model_info: dict
    data_info: dict
    cache: ActivationCache | None = None


def open_data(spec: DataSpec) -> OpenedData:
    if spec.activations is not None:
        source: TensorSource | ShardSource = load_activation_file(spec.activations)
        if spec.tokens is not None and spec.tokens < source.num_rows:
            source = TensorSource(source.rows_ND[: spec.tokens])
        return OpenedData(
            source=source,
            lm=None,
            model_info={"name": None, "layer": None, "hook": None},
            data_info={"activations": str(spec.activations), "rows": source.num_rows},
        )
    lm = load_language_model(spec.model, spec.layer, spec.device)
    cache = ActivationCache(lm, spec.corpus or "demo", spec.context_len)
    source = cache.ensure(spec.tokens)
    if source.num_rows < 2:
        raise HSAEError(f"corpus {cache.corpus!r} yields only {source.num_rows} token(s)")
    return OpenedData(
        source=source,
        lm=lm,
        model_info={"name": lm.name, "layer": lm.layer, "hook": lm.hook_name},
        data_info={"corpus": cache.info["corpus"], "context_len": spec.context_len, "tokens": source.num_rows,
                   "cache_key": cache.key},
        cache=cache,
    )
