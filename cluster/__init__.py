"""lessserve.cluster."""
