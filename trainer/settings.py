"""One source of environment-driven defaults, shared by the CLI, the indexer and the server."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HSAE_", extra="ignore")

    data_dir: Path = Field(
        default_factory=lambda: Path.cwd() / "data",
        description="Git-ignored folder for converted models, corpora, activation caches, runs and the SQLite file.",
    )
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default: SQLite file hsae.db under data_dir."
    )
    write_token: str | None = Field(default=None, description="Bearer token that allows annotation writes.")

    # The API server (`hsae serve`).
    api_threads: int = Field(
        default=4, ge=1, description="Threads running the requests' database work (more add lock contention)."
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
    max_body_bytes: int = Field(
        default=1 << 20, ge=1024, description="Largest request body (larger: 413)."
    )
    max_import_bytes: int = Field(
        default=64 << 20, ge=1024, description="Largest subtree document an import accepts (larger: 413)."
    )

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'hsae.db').resolve()}"

    def subdir(self, name: str) -> Path:
        path = self.data_dir / name
        path.mkdir(parents=True, exist_ok=True)
        return path


@lru_cache
def get_settings() -> Settings:
    return Settings()
