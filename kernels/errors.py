"""The compute kernels' errors, under KernelError of the one tree (lessserve.errors)."""

from lessserve.errors.tree import ConfigError, KernelError


class KernelUnavailableError(KernelError, ConfigError):
    """`triton` was requested but Triton (or a driver / the interpreter) is not available."""


class KernelInputError(KernelError, ValueError):
    """A kernel got tensors of the wrong shape, dtype, device or layout."""


class PackError(KernelInputError):
    """A slab or packed buffer does not match the pack layout."""


__all__ = ["KernelError", "KernelInputError", "KernelUnavailableError", "PackError"]
