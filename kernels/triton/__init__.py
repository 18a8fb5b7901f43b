"""lessserve.kernels.triton."""
