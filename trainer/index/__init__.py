"""Indexing a checkpoint: streaming per-feature statistics (accumulate), decoder-direction statistics
(directions), the contexts examples show (contexts), and the atomic database write (writer)."""

from trainer.index.accumulate import IndexAccumulator, IndexConfig, IndexResult
from trainer.index.contexts import ContextProvider, ContextRecord, ContextStore
from trainer.index.directions import OutputTokens, decoder_cosines, top_output_tokens
from trainer.index.writer import RunExistsError, RunInfo, write_run

__all__ = [
    "ContextProvider",
    "ContextRecord",
    "ContextStore",
    "IndexAccumulator",
    "IndexConfig",
    "IndexResult",
    "OutputTokens",
    "RunExistsError",
    "RunInfo",
    "decoder_cosines",
    "top_output_tokens",
    "write_run",
]
