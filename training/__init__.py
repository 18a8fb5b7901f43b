"""lessserve.training: training the learned LESS weights (phi/psi) of a model, policy and budget."""
