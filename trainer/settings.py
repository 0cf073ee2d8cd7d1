"""Environment-driven defaults of the trainer: where data (models, corpora, activations, runs) lives.

The server's settings (database, write token, live inference) extend these in backend/settings.py: the
trainer knows nothing of databases or servers.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HSAE_", extra="ignore")

    data_dir: Path = Field(
        default_factory=lambda: Path.cwd() / "data",
        description=(
            "Git-ignored folder for converted models, corpora, activation caches, runs and the SQLite file."
        ),
    )

    def subdir(self, name: str) -> Path:
        path = self.data_dir / name
        path.mkdir(parents=True, exist_ok=True)
        return path


@lru_cache
def get_settings() -> Settings:
    return Settings()
