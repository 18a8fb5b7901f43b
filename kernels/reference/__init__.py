"""lessserve.kernels.reference."""
