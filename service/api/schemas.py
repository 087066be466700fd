"""Request and response bodies (they also make the OpenAPI document at /docs)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"
# Field limits: the body limit (service.api.limits) bounds a request; these bound what one request
# may store or ask for, so no field can carry a whole body's worth into a row or a job.
MAX_NAMES = 1000  # checkpoints named in one request (scoring, features)
Text200 = Annotated[str, StringConstraints(min_length=1, max_length=200)]
TagKey = Annotated[str, StringConstraints(min_length=1, max_length=100)]
TagValue = (
    Annotated[str, StringConstraints(max_length=1000)]
    | int
    | Annotated[float, Field(allow_inf_nan=False)]
    | bool
    | None
)
ParameterKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class Page(BaseModel):
    total: int
    offset: int
    limit: int


class CheckpointIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(min_length=1, max_length=4096, description="directory under a configured catalog root")
    name: str | None = Field(default=None, pattern=NAME_PATTERN)
    base: str | None = Field(default=None, max_length=200)
    tasks: list[Text200] = Field(default_factory=list, max_length=64)
    family: str | None = Field(default=None, max_length=200)
    tags: dict[TagKey, TagValue] = Field(
        default_factory=dict, max_length=64, description="up to 64 scalars; keys ≤ 100, strings ≤ 1000 chars"
    )


class CheckpointOut(BaseModel):
    name: str
    path: str
    base: str | None
    content_hash: str
    architecture: str
    tasks: list[str]
    family: str | None
    tags: dict[str, Any]
    plan: dict[str, Any] | None
    num_parameters: int


class CheckpointPage(Page):
    items: list[CheckpointOut]


class TaskOut(BaseModel):
    name: str
    metric: str
    held_out: bool
    examples: int | None = None


class ArmIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    parameters: dict[ParameterKey, Any] = Field(default_factory=dict, max_length=32)
    name: str | None = Field(default=None, max_length=200)


class ArmOut(BaseModel):
    name: str
    family: str
    parameters: dict[str, Any]


class OperatorOut(BaseModel):
    """What an operator declares about itself (`MergeOperator.describe`), with its arms."""

    name: str
    description: str = ""
    needs_base: bool
    accepts_base: bool = True
    min_models: int | None
    max_models: int | None
    elementwise: bool
    random: bool = False
    interpolates_inputs: bool = False
    traits: dict[str, bool] = Field(default_factory=dict, description="what selection describes it by")
    method_params: list[dict[str, Any]] = Field(default_factory=list, description="with defaults and ranges")
    model_params: list[dict[str, Any]] = Field(default_factory=list)
    arms: list[ArmOut]


class TokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN)
    scopes: list[Literal["read", "write", "admin"]] = Field(min_length=1)


class TokenOut(BaseModel):
    name: str
    scopes: list[str]
    token: str = Field(description="shown once; only its sha256 is stored")


class TokenInfo(BaseModel):
    name: str
    scopes: list[str]
    source: Literal["config", "api"]
    revoked: bool
    created_at: dt.datetime
    revoked_at: dt.datetime | None


class RecommendationIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models: list[Text200] = Field(min_length=2, max_length=64)
    top: int = Field(default=3, ge=1, le=100)
    task: Text200 | None = None
    mode: Literal["exploit", "explore"] = Field(
        default="exploit",
        description="once feedback exists: the bandit's posterior mean (exploit) or its upper bound (explore)",
    )


class RecommendedPlan(BaseModel):
    rank: int
    models: list[str]
    steps: list[dict[str, Any]]
    predicted_score: float
    uncertainty: float
    mergekit_yaml: str
    drivers: list[Any] | dict[str, Any] = Field(default_factory=list)
    kind: str | None = None
    description: str | None = None
    plan: dict[str, Any] | None = Field(default=None, description="post it to /v1/merges as is")
    bandit_score: float | None = Field(default=None, description="the bandit's estimate once feedback exists")
    bandit_width: float | None = None


class RecommendationOut(BaseModel):
    plans: list[RecommendedPlan]
    task: str | None = None
    ranked_by: str = Field(default="regressor", description="'regressor', or 'bandit (exploit|explore)'")


class MergeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN, description="catalog name of the merged checkpoint")
    plan: dict[str, Any] | None = Field(default=None, description="a plan as Plan.to_dict() writes it")
    mergekit_yaml: str | None = Field(default=None, max_length=256 * 1024)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    predicted_score: float | None = Field(
        default=None, allow_inf_nan=False, description="the recommendation's prediction; the bandit's prior"
    )


class ScoringIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models: list[Text200] | None = Field(
        default=None, max_length=MAX_NAMES, description="defaults to the whole catalog"
    )
    methods: list[Text200] | None = Field(default=None, max_length=64)


class FeaturesIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models: list[Text200] | None = Field(
        default=None, max_length=MAX_NAMES, description="defaults to the whole catalog"
    )
    probes: Text200 | None = Field(default=None, description="name of an uploaded task used as probes")


class JobOut(BaseModel):
    id: str
    kind: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    progress: float
    message: str | None
    attempts: int
    max_attempts: int
    error: str | None
    cancel_requested: bool
    request: dict[str, Any]
    result: dict[str, Any] | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None


class JobPage(Page):
    items: list[JobOut]


class ScoreRow(BaseModel):
    model_a: str
    model_b: str
    method: str
    parameters: dict[str, Any]
    predicted_score: float
    uncertainty: float


class ScorePage(Page):
    items: list[ScoreRow]


class FeedbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    merge_id: str | None = Field(
        default=None, max_length=64, description="the merge job that made the checkpoint"
    )
    checkpoint: Text200 | None = Field(default=None, description="or the merged checkpoint's catalog name")
    task: str = Field(min_length=1, max_length=200)
    score: float = Field(
        allow_inf_nan=False, ge=-10, le=10, description="normalised score: 1 is the expert's own on its task"
    )


class FeedbackOut(BaseModel):
    id: int
    checkpoint: str
    task: str
    score: float
    merge_id: str | None
