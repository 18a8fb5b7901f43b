"""lessserve.cache_store."""
