"""lessserve.kernels."""
