"""Prefect flows and the `versvideo` command line."""

import os

# Prefect settings for a pipeline on this machine, set before Prefect is first imported; a user's
# own environment or Prefect profile wins (setdefault). Without PREFECT_API_URL each run starts a
# temporary local server, whose first start creates and migrates its database: on a fresh
# PREFECT_HOME and a busy 2-core machine that took longer than Prefect's 20 s start-up limit, and
# the server's telemetry service wrote its heartbeat into the database being migrated ("database
# is locked" tracebacks). Our runs report to MLflow, not to Prefect's analytics.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "600")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
