"""lessserve.bench: benchmark programs (decode, offload, serve, kernels): one timer, one result
type, one writer of table + JSON + PNG."""
