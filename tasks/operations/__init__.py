"""Running the pipeline as a service: the Ray runtime, MLflow lineage of stages and runs, and
promotion of a better model."""
