"""lessserve.workers."""
