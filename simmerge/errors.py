"""Errors a user can fix. The CLI maps them to exit code 2, the REST layer to a 4xx status."""


class SimMergeError(Exception):
    """Bad input: the message names the offending value (path, tensor, shape, parameter)."""

    http_status: int = 400


class NotFoundError(SimMergeError):
    """A named thing (checkpoint, task, job, file) does not exist."""

    http_status = 404


class ConflictError(SimMergeError):
    """The request clashes with what is stored (a duplicate registration, say)."""

    http_status = 409


class CheckpointError(SimMergeError):
    """A directory is not a readable Hugging Face safetensors checkpoint."""


class IncompatibleCheckpointsError(SimMergeError):
    """Checkpoints differ in a tensor's name, shape or dtype."""


class PlanError(SimMergeError):
    """A merge plan is malformed: unknown method or parameter, value out of range, wrong model count."""
