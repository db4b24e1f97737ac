"""Using trained and frozen networks: the cache's encoders, loading exported models, sampling
videos, control conditions and style embeddings, CLIP scoring, and the `generate` command."""
