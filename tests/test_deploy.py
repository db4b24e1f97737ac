"""The deployment recipes in deploy/, checked against what they must agree with: the Prefect
deployment is deployed for real onto the session's Prefect server (a process work pool) and read
back through its API; the image definition and the KubeRay RayJob are checked against the lock,
the Makefile, the package list and the L preset they must match, so neither drifts silently."""

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml
from packaging.specifiers import SpecifierSet

from tasks.config.params import preset_values

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
BIN = Path(sys.executable).parent


def locked_version(package: str) -> str:
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    return next(entry["version"] for entry in lock["package"] if entry["name"] == package)


def test_the_prefect_deployment_deploys_onto_a_work_pool_with_its_schedule_and_pull_steps(prefect_api, tmp_path):
    for name in ("flows", "tasks", "model", "eval", "deploy"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, **prefect_api, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "VERSVIDEO_GIT_URL": "https://git.example.com/team/versvideo.git"}

    def prefect(*arguments: str) -> str:
        finished = subprocess.run(["prefect", *arguments], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert finished.returncode == 0, (finished.stdout + finished.stderr)[-3000:]
        return finished.stdout

    prefect("work-pool", "create", "versvideo", "--type", "process")
    prefect("--no-prompt", "deploy", "--all", "--prefect-file", "deploy/prefect.yaml")

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_api["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("versvideo-retrain/versvideo-retrain")
    assert deployment.entrypoint == "flows/retrain.py:retrain" and deployment.work_pool_name == "versvideo"
    assert [schedule.schedule.cron for schedule in deployment.schedules] == ["0 3 * * *"]
    assert deployment.parameters == {"new_csv": "", "metric": "heldout/fvd", "lower_is_better": True, "model_name": "versvideo"}
    clone, pull = deployment.pull_steps
    assert clone["prefect.deployments.steps.git_clone"]["repository"] == "https://git.example.com/team/versvideo.git"  # from the env, not the file
    assert pull["prefect.deployments.steps.run_shell_script"]["script"] == "dvc pull --allow-missing"
    assert set(deployment.parameter_openapi_schema["properties"]) == set(deployment.parameters)  # the flow's own signature


def test_the_image_installs_the_locked_environment_and_every_package_of_the_project():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    python = re.search(r"^FROM python:(\d+\.\d+)", dockerfile, flags=re.MULTILINE).group(1)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert SpecifierSet(project["project"]["requires-python"]).contains(f"{python}.0")
    makefile_uv = re.search(r"^UV_VERSION := (\S+)", (REPO / "Makefile").read_text(), flags=re.MULTILINE).group(1)
    assert re.search(r"^ARG UV_VERSION=(\S+)", dockerfile, flags=re.MULTILINE).group(1) == makefile_uv
    syncs = re.findall(r"^RUN uv sync (.*)$", dockerfile, flags=re.MULTILINE)
    assert syncs and all("--locked" in sync and "--no-dev" in sync for sync in syncs)  # exactly uv.lock, no test tools
    copied = [source for line in re.findall(r"^COPY (.+)$", dockerfile, flags=re.MULTILINE) for source in line.split()[:-1]]
    assert all((REPO / source).exists() for source in copied)  # no COPY of a file that is not there
    packages = project["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    assert set(packages) <= set(copied) and {"pyproject.toml", "uv.lock", "README.md"} <= set(copied)


def test_the_rayjob_runs_the_pipeline_on_the_locked_ray_with_the_gpus_the_l_preset_asks_for():
    job = yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == locked_version("ray")  # the head's and workers' Ray is the driver's
    head = cluster["headGroupSpec"]["template"]["spec"]
    workers = [group["template"]["spec"] for group in cluster["workerGroupSpecs"]]
    pods = [head, *workers]
    assert len({container["image"] for pod in pods for container in pod["containers"]}) == 1  # one image everywhere
    for pod in pods:  # every pod sees the checkout and data/ where the stages write them, and the same services
        [container] = pod["containers"]
        claims = {volume["name"]: volume.get("persistentVolumeClaim", {}).get("claimName") for volume in pod["volumes"]}
        assert {"name": "work", "mountPath": "/work"} in container["volumeMounts"] and claims["work"] == "versvideo-work"
        assert container["envFrom"] == head["containers"][0]["envFrom"]
    gpus = sum(int(group["replicas"]) * int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) for group in cluster["workerGroupSpecs"])
    assert gpus >= max(section["num_workers"] for section in preset_values("L").values() if isinstance(section, dict) and section.get("use_gpu"))
    entrypoint = job["spec"]["entrypoint"]
    steps = ["git clone", "dvc pull", "versvideo pipeline", "dvc push"]
    assert all(step in entrypoint for step in steps) and sorted(steps, key=entrypoint.index) == steps
