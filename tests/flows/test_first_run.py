"""A new user's first command on a fresh machine: no ~/.prefect, no MLflow database, no Prefect
or MLflow server in the environment, the environment not activated. `versvideo pipeline` must
start Prefect's temporary server (creating its database), run the stage and print no traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def test_first_pipeline_run_with_a_fresh_home_prints_no_traceback(tmp_path):
    work, home = tmp_path / "checkout", tmp_path / "home"
    home.mkdir()
    work.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, work / name)
    for folder in ("tasks", "model", "eval"):  # dvc.yaml's code deps
        shutil.copytree(REPO / folder, work / folder, ignore=shutil.ignore_patterns("__pycache__"))
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "MLFLOW_", "RAY_"))}
    # the environment's bin/ not on PATH, as when a user runs .venv/bin/versvideo or a scheduler does:
    # dvc.yaml's `versvideo stage ...` commands must still find this environment's versvideo
    env.update(HOME=str(home), PATH=os.pathsep.join(entry for entry in env.get("PATH", "").split(os.pathsep) if Path(entry) != BIN))
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=work, env=env, check=True)

    result = subprocess.run([str(BIN / "versvideo"), "pipeline", "--stages", "prepare"], cwd=work, env=env,
                            capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Traceback" not in output and "database is locked" not in output, output
    assert (home / ".prefect").is_dir()  # the temporary server's database was created here, first time
    assert (work / "data" / "raw" / "webvid.csv").is_file() and "prepare " in result.stdout
