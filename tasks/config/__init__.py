"""Configuration: the typed params.yaml schema with the presets' defaults (params.py) and every
stage output path (paths.py)."""
