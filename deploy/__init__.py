"""lessserve.deploy."""
