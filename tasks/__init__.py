"""Pipeline stages (one module per DVC stage) and the plumbing they share."""

import os

# Must be set before `ray` is first imported (Ray reads it at import time). Under `uv run`, Ray
# would otherwise start workers through `uv run` inside a zipped copy of the working directory
# (data/ included), which is slow and breaks with a relative uv path. Our workers already run
# this interpreter, with this project installed.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
