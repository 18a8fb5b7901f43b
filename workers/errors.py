"""The engine's errors, each under a category of the one tree (lessserve.errors)."""

from lessserve.errors.tree import (  # noqa: F401  (re-exported: callers import the tree from here too)
    CapacityError,
    ConfigError,
    LessServeError,
    NotFoundError,
    RequestError,
)


class ModelNotFoundError(ConfigError):
    """The model name/path could not be resolved to local weights."""


class UnsupportedModelError(ConfigError):
    """The checkpoint is not a supported Llama-family architecture."""


class LessWeightsMissingError(ConfigError):
    """A `+less` policy was requested but no trained LESS weights exist for this model/policy."""


LessKernelsMissingError = LessWeightsMissingError  # the old name, kept for one release


class SlotsExhaustedError(CapacityError):
    """No free session slot is left in the slab."""


class SchedulerStoppedError(CapacityError):
    """The worker's scheduler has stopped (the replica is shutting down): nothing more runs on it."""


class SlotStateError(LessServeError):
    """A slot id is invalid, not allocated, or used inconsistently (a bug, never a user's doing)."""


class ContextOverflowError(RequestError):
    """A session would exceed what its policy can hold (e.g. `full` past max_context)."""


class SessionNotFoundError(NotFoundError):
    """No such session for this owner (another owner's session is reported the same way)."""


class ToolChoiceError(RequestError):
    """tool_choice 'auto' on a model whose chat template renders no tools or whose calls cannot be parsed."""
