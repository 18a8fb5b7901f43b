"""lessserve.evals: quality evaluations (perplexity, passkey, the quality report, the kvpress peer)."""
