"""Typed errors raised by the engine. Callers map them to CLI exits or HTTP 4xx."""


class LessServeError(Exception):
    """Base class for every error this package raises on purpose."""


class ModelNotFoundError(LessServeError):
    """The model name/path could not be resolved to local weights."""


class UnsupportedModelError(LessServeError):
    """The checkpoint is not a supported Llama-family architecture."""


class ConfigError(LessServeError):
    """A configuration value is invalid (policy, budget, kernels file, ...)."""


class SlotsExhaustedError(LessServeError):
    """No free session slot is left in the slab."""


class SlotStateError(LessServeError):
    """A slot id is invalid, not allocated, or used inconsistently."""


class ContextOverflowError(LessServeError):
    """A session would exceed what its policy can hold (e.g. `full` past max_context)."""


class LessKernelsMissingError(ConfigError):
    """A `+less` policy was requested but no trained kernels exist for this model/policy."""
