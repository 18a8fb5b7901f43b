"""lessserve.lab: what evaluations, training and benchmarks share (one loaded model for many
engines, result output: tables, JSON, plots, progress). The serving code never imports it."""
