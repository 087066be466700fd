"""Service settings from `SIMMERGE_*` environment variables and an optional env file.

One object carries everything the server and its job workers need, so a worker process can be
handed the exact settings of the server that spawned it (`worker_json`, on its stdin), tokens
excluded. Secrets (tokens, the database URL's password) never appear in an error about them:
`load_settings` reports a bad value by its variable's name only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from simmerge.errors import SimMergeError
from simmerge.home import resolve_home

# Where a web worker finds its settings: a file readable by the service's user only, not the settings
# themselves in the environment (they hold the database URL).
WORKER_SETTINGS_FILE_ENV = "SIMMERGE_WORKER_SETTINGS_FILE"
# Variables whose values are secrets: dropped from the server's environment once read (`serve`).
SECRET_ENV = ("SIMMERGE_TOKENS", "SIMMERGE_DATABASE_URL")
TOKEN_SCOPES = ("read", "write", "admin")
DATABASE_DRIVERS = ("sqlite", "postgresql", "postgresql+psycopg")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class SettingsInvalidError(SimMergeError):
    """A setting is malformed; the message names its variable and never echoes a secret value."""


class TokenSpec(BaseModel):
    """A configured bearer token: its sha256 (preferred) or its clear text, hashed here and dropped,
    so the clear text lives no longer than the parsing of the configuration."""

    scopes: list[str] = Field(default_factory=lambda: ["read"])
    sha256: str | None = None
    token: str | None = Field(default=None, exclude=True, repr=False)

    @model_validator(mode="after")
    def _hash_clear_token(self) -> TokenSpec:
        if (self.sha256 is None) == (self.token is None):
            raise ValueError("give either a 64-hex-digit 'sha256' or a 'token'")
        if self.token is not None:
            if not self.token.strip():
                raise ValueError("'token' is empty")
            self.sha256, self.token = hashlib.sha256(self.token.encode()).hexdigest(), None
        self.sha256 = (self.sha256 or "").lower()
        if not _HEX64.match(self.sha256):
            raise ValueError("'sha256' must be 64 hexadecimal digits")
        unknown = [s for s in self.scopes if s not in TOKEN_SCOPES]
        if unknown or not self.scopes:
            raise ValueError(f"scopes must be among {', '.join(TOKEN_SCOPES)}")
        return self


def mask_url(raw: str) -> str:
    """The URL with its password replaced by ***, even when it does not parse."""
    try:
        return make_url(raw).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return re.sub(r"^([^:]*:)?.*@", lambda m: f"{m.group(1) or ''}***@", raw)


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
    max_upload_bytes: int = Field(default=16 * 2**20, ge=1)
    # Every other request body (JSON) above this gets 413 before a route reads it.
    max_body_bytes: int = Field(default=2**20, ge=1)
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

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            driver = make_url(value).drivername
        except (ArgumentError, ValueError):
            raise ValueError(f"{mask_url(value)!r} is not a database URL") from None
        if driver not in DATABASE_DRIVERS:
            raise ValueError(f"{mask_url(value)!r}: the driver must be one of {', '.join(DATABASE_DRIVERS)}")
        return value

    @field_validator("tokens")
    @classmethod
    def _distinct_tokens(cls, value: dict[str, TokenSpec]) -> dict[str, TokenSpec]:
        names_by_digest: dict[str, list[str]] = {}
        for name, spec in value.items():
            names_by_digest.setdefault(spec.sha256 or "", []).append(name)
        shared = next((names for names in names_by_digest.values() if len(names) > 1), None)
        if shared:
            raise ValueError(f"tokens {', '.join(map(repr, shared))} have the same value")
        return value

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

    @classmethod
    def from_worker_json(cls, raw: str) -> ServiceSettings:
        """The settings `worker_json` wrote (validated as given: no environment or env file read)."""
        return cls.model_validate(json.loads(raw))

    @classmethod
    def from_worker_env(cls) -> ServiceSettings:
        """A web worker's settings, from the file the supervisor named in its environment."""
        path = os.environ.get(WORKER_SETTINGS_FILE_ENV)
        return cls.from_worker_json(Path(path).read_text()) if path else load_settings()

    def write_worker_file(self, directory: Path) -> Path:
        """`worker_json` in a new file under `directory` that only this user can read."""
        path = directory / "settings.json"
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
            out.write(self.worker_json())
        return path


def drop_secret_environment() -> None:
    """Forget the secret variables once the settings hold them, so no process started from here
    (job workers, a local Ray, web workers) inherits them."""
    for name in SECRET_ENV:
        os.environ.pop(name, None)


def load_settings(**overrides: Any) -> ServiceSettings:
    """The settings for start-up; a bad value is one line naming its variable, never its value
    (pydantic's own message quotes the input, which may be a token or a password)."""
    try:
        return ServiceSettings(**overrides)
    except ValidationError as exc:
        raise SettingsInvalidError(_describe(exc)) from None
    except SettingsError as exc:  # a value the env source could not decode (JSON, say)
        field = re.search(r'field "([^"]+)"', str(exc))
        name = f"SIMMERGE_{field.group(1).upper()}" if field else "a SIMMERGE_* variable"
        raise SettingsInvalidError(f"{name} could not be parsed (JSON expected)") from None


def _describe(exc: ValidationError) -> str:
    """`SIMMERGE_TOKENS (ci): Value error, ...; ...` from the errors' locations and messages only."""
    parts = []
    for error in exc.errors(include_input=False, include_url=False)[:3]:
        field, *rest = [str(part) for part in error["loc"]] or ["settings"]
        where = f"SIMMERGE_{field.upper()}" + (f" ({'.'.join(rest)})" if rest else "")
        parts.append(f"{where}: {error['msg']}")
    return "invalid setting " + "; ".join(parts)
