"""Live prompt activations: a run's language model and HSAE, loaded once and kept, behind a bounded queue.

- model.py: what the service needs of a run (LiveRunSpec) and of a model (the LiveModel protocol, its codes);
  `load_model` imports the real one (transformer.py, torch and the language model) on first use only, so a
  server that is only browsed never imports torch.
- transformer.py: TransformerLiveModel, a run's language model stopped after its layer, and its HSAE.
- answer.py: the answer's shape: per-token features with parent links, and the summary tree.
- service.py: LiveService (activations, steering), the bounded queue, batching, deadlines, the model cache.
- errors.py: the errors a live request can answer with (413, 503, 504, 409).

As in the index, every prompt starts with the tokenizer's BOS token, which takes the attention-sink role and
is not shown; special tokens written in the text are dropped; a latent is active when its value is > 0.
"""

from backend.live.errors import LiveBusy, LiveError, LiveTimeout, LiveUnavailable, PromptTooLong
from backend.live.model import (
    Continuation,
    LevelCodes,
    LiveModel,
    LiveRunSpec,
    PromptToken,
    SteerOutput,
    SteerTerm,
)
from backend.live.service import LiveResult, LiveService

__all__ = [
    "Continuation",
    "LevelCodes",
    "LiveBusy",
    "LiveError",
    "LiveModel",
    "LiveResult",
    "LiveRunSpec",
    "LiveService",
    "LiveTimeout",
    "LiveUnavailable",
    "PromptToken",
    "PromptTooLong",
    "SteerOutput",
    "SteerTerm",
]
