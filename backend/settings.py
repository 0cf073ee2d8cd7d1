"""The server's and the database's environment-driven defaults, shared by the CLI's database commands, the
index writer and the API server. They extend the trainer's settings (the data folder), which the SQLite
default lives in."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field

from trainer.settings import Settings as TrainerSettings


class Settings(TrainerSettings):
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default: SQLite file hsae.db under data_dir."
    )
    write_token: str | None = Field(default=None, description="Bearer token that allows annotation writes.")

    # The API server (`hsae serve`).
    api_threads: int = Field(
        default=4, ge=1, description="Threads running the requests' database work (more add lock contention)."
    )
    api_cache_bytes: int = Field(
        default=64 << 20, ge=0,
        description="Bytes of serialized answers about runs each server process keeps (0: none; see ETags).",
    )
    max_prompt_tokens: int = Field(
        default=256, ge=1, description="Longest prompt the live endpoint encodes (longer: 413)."
    )
    live_queue_size: int = Field(
        default=32, ge=1, description="Live requests that may wait for the model (more: 503)."
    )
    live_batch_size: int = Field(
        default=8, ge=1, description="Queued prompts encoded together in one forward pass."
    )
    live_timeout_s: float = Field(
        default=30.0, gt=0, description="A live request taking longer than this gets 504."
    )
    live_cached_runs: int = Field(
        default=2, ge=1, description="Runs whose models the live service keeps loaded."
    )
    live_device: str = Field(
        default="auto", description="Device of the live models: auto (cuda if available), cpu, cuda, cuda:N."
    )
    live_cpu_threads: int | None = Field(
        default=None, ge=1, description="Torch CPU threads of live models; `hsae serve` default: cores - 1."
    )
    live_preload: str = Field(
        default="",
        description="Runs whose live models load (and run once) at start-up, so the first prompt is as fast "
        "as the rest: names separated by commas, or * for the newest runs with a checkpoint (at most "
        "live_cached_runs). Empty: each loads on its first prompt (a browse-only server never imports "
        "torch).",
    )
    max_body_bytes: int = Field(
        default=1 << 20, ge=1024, description="Largest request body (larger: 413)."
    )
    max_import_bytes: int = Field(
        default=64 << 20, ge=1024, description="Largest subtree document an import accepts (larger: 413)."
    )

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'hsae.db').resolve()}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
