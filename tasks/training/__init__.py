"""Training on Ray Train: the engine (loop, checkpoints, EMA, MLflow, launch) and the recipes
it runs (what one step of each model is)."""
