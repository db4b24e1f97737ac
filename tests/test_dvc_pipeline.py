"""dvc.yaml end to end on a tiny synthetic set: the stages run, and a second `dvc repro` with
nothing changed runs nothing; changing a param a stage reads reruns that stage and what follows."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "filter", "decode", "cache_latents")


def run(command, cwd):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_second_repro_does_nothing(tmp_path):
    for name in ("dvc.yaml", "tasks", "model"):
        source = REPO / name
        (shutil.copytree(source, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__")) if source.is_dir() else shutil.copy(source, tmp_path / name))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prepare"].update(num_videos=6, seconds=1.5)
    params["cache_latents"]["smoke_vae_fit_steps"] = 20
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], tmp_path)
    run(["dvc", "init", "-q"], tmp_path)

    first = run(["dvc", "repro", "cache_latents"], tmp_path)  # the data stages; training has its own tests
    assert all(f"Running stage '{stage}'" in first for stage in STAGES)
    second = run(["dvc", "repro", "cache_latents"], tmp_path)
    assert "Running stage" not in second
    assert all(f"Stage '{stage}' didn't change" in second for stage in STAGES)

    third = run(["dvc", "repro", "-s", "cache_latents"], tmp_path)  # still nothing to do
    assert "Running stage" not in third
    params["filter"]["min_motion"] = 0.003
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = run(["dvc", "repro", "cache_latents"], tmp_path)
    assert "Running stage 'prepare'" not in changed
    assert "Running stage 'filter'" in changed
    # kept.parquet is byte-identical (no synthetic video sits near the threshold), so decode is skipped
    assert "Running stage 'decode'" not in changed
