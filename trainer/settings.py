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
