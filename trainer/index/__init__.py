"""Indexing a checkpoint: streaming per-feature statistics (accumulate), decoder-direction statistics
(directions), the contexts examples show (contexts), and the whole pass over a corpus (pipeline), which ends
at plain data. Writing it to a database is the backend's (backend/index)."""

from trainer.index.accumulate import IndexAccumulator, IndexConfig, IndexResult
from trainer.index.contexts import ContextProvider, ContextRecord, ContextStore
from trainer.index.directions import OutputTokens, decoder_cosines, pair_cosines, top_output_tokens
from trainer.index.run import RunInfo

__all__ = [
    "ContextProvider",
    "ContextRecord",
    "ContextStore",
    "IndexAccumulator",
    "IndexConfig",
    "IndexResult",
    "OutputTokens",
    "RunInfo",
    "decoder_cosines",
    "pair_cosines",
    "top_output_tokens",
]
