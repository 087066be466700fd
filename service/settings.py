"""Service settings from `SIMMERGE_*` environment variables and an optional env file.

One object carries everything the server and its job workers need, so a worker process can be
handed the exact settings of the server that spawned it (`to_worker_env`), tokens excluded.
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from simmerge.home import resolve_home

WORKER_SETTINGS_ENV = "SIMMERGE_WORKER_SETTINGS"


class TokenSpec(BaseModel):
    """A configured bearer token: its sha256 (preferred) or its clear text, hashed on load."""

    scopes: list[str] = Field(default_factory=lambda: ["read"])
    sha256: str | None = None
    token: str | None = None


class ServiceSettings(BaseSettings):
    """Every knob of the service; read once at start-up."""

    model_config = SettingsConfigDict(
        env_prefix="SIMMERGE_",
        env_file=os.environ.get("SIMMERGE_ENV_FILE", ".env"),
        env_file_encoding="utf-8",
        extra="ignore",
    )

    home: Path | None = None
    database_url: str | None = None
    # Checkpoints may be registered by path only under these directories (os.pathsep-separated in env).
    catalog_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    max_upload_bytes: int = 16 * 2**20
    # Bearer tokens: JSON object {name: {"scopes": [...], "sha256": hex} or {"scopes": [...], "token": clear}}.
    tokens: dict[str, TokenSpec] = Field(default_factory=dict)
    read_requires_auth: bool = False
    job_backend: Literal["local", "ray"] = "local"
    max_job_attempts: int = 3
    max_concurrent_jobs: int = 1
    job_poll_interval_s: float = 0.2
    # A running job whose dispatcher has not renewed its lease for this long is taken over.
    job_lease_s: float = 30.0
    merge_device: str = "auto"  # "auto": cuda when available, else cpu
    ray_address: str | None = None
    ray_num_gpus: float = 1.0
    ray_num_cpus: float = 1.0
    # Fault injection for tests and drills: a worker sleeps this long at each progress report.
    worker_step_delay_s: float = 0.0
    # A pair-feature table (Parquet/CSV: model_a, model_b, features...) used instead of cached signatures.
    pair_features: Path | None = None
    # `module:attribute` of the object that scores catalogs and computes features inside workers.
    job_runners: str = "service.adapters:MODELS_RUNNERS"
    run_migrations: bool = True
    start_jobs: bool = True
    # Web worker processes of `simmerge serve` (one job dispatcher whatever the count; see service.server).
    workers: int = Field(default=1, ge=1, le=64)

    @field_validator("catalog_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            return [part for part in value.split(os.pathsep) if part.strip()]
        return value

    @cached_property
    def home_dir(self) -> Path:
        return resolve_home(self.home)

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home_dir / 'simmerge.db'}"

    @property
    def merges_dir(self) -> Path:
        return self.home_dir / "merges"

    @property
    def tasks_dir(self) -> Path:
        return self.home_dir / "tasks"

    @property
    def scratch_dir(self) -> Path:
        """Where running jobs write; nothing here is ever registered as it is."""
        return self.home_dir / "jobs"

    @property
    def allowed_roots(self) -> list[Path]:
        """Configured roots plus the service's own merge output directory."""
        return [Path(root).expanduser().resolve() for root in self.catalog_roots] + [
            self.merges_dir.resolve()
        ]

    def worker_json(self) -> str:
        """The settings a job worker needs, serialised; tokens stay in the server."""
        data = self.model_dump(mode="json", exclude={"tokens"})
        data["home"] = str(self.home_dir)
        return json.dumps(data)

    @property
    def resolved_merge_device(self) -> str:
        if self.merge_device != "auto":
            return self.merge_device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def to_worker_env(self) -> dict[str, str]:
        return {WORKER_SETTINGS_ENV: self.worker_json()}

    @classmethod
    def from_worker_env(cls) -> ServiceSettings:
        raw = os.environ.get(WORKER_SETTINGS_ENV)
        return cls.model_validate(json.loads(raw)) if raw else cls()
