"""Real services on 127.0.0.1 for the tests that need them: a Prefect server, an MLflow tracking
server, a Ray head node and an S3-compatible object store, each its own process started the way an
operator would start it (`prefect server start`, `mlflow server`, `ray start --head`,
`moto_server`), stopped with its whole process tree.

Each comes with what a client needs to reach it (the env variables the pipeline reads), so a test
runs the pipeline against them exactly as a user's shell with those variables exported would.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent  # the environment's console scripts: prefect, mlflow, ray
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def http_ok(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status == 200
        except OSError:
            return False
    return check


def stop(processes: list[subprocess.Popen]) -> None:
    """SIGTERM each service, which stops what it started (uvicorn workers; `ray start --block`
    stops the raylet and GCS), give them 5 s together, then SIGKILL whatever of their process
    trees is left: nothing they started outlives the test session."""
    trees = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            trees.extend(psutil.Process(process.pid).children(recursive=True))
        process.terminate()
    deadline = time.monotonic() + 5
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
    for member in trees:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    psutil.wait_procs(trees, timeout=10)
    for process in processes:
        process.kill()
        process.wait()


class Service:
    """A service process, started at construction; `running` waits until it is ready and stops it."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], log: Path, ready: Callable[[], bool], scratch: Path | None = None) -> None:
        self.name, self.log, self.ready, self.scratch = name, log, ready, scratch  # scratch: a folder removed once it stops
        self.process = subprocess.Popen(command, env=env, cwd=log.parent, stdout=log.open("w"), stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 180) -> None:
        """Until `ready()`; a service that exits or is not ready in time fails with its log's tail."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            exited = self.process.poll() is not None
            if exited or time.monotonic() > deadline:
                why = f"exited {self.process.returncode}" if exited else f"not ready in {timeout:.0f} s"
                raise RuntimeError(f"{self.name} did not start ({why}):\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)


@contextlib.contextmanager
def running(*services: Service) -> Iterator[None]:
    """The services, already starting side by side, once all are ready; stopped when the block ends."""
    try:
        for started in services:
            started.wait()
        yield
    finally:
        stop([started.process for started in services])
        for started in services:
            if started.scratch:
                shutil.rmtree(started.scratch, ignore_errors=True)


def prefect_server(folder: Path) -> tuple[Service, dict[str, str]]:
    """`prefect server start` with its own home (database, settings) in `folder`; the API and the
    two services that turn the client's events into task runs and stored events (no UI, scheduler
    or other background loops, no analytics). Returns it and its client env."""
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(folder / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    for name in ("cancellation_cleanup", "db_vacuum", "event_logger", "foreman", "late_runs", "scheduler", "pause_expirations", "repossessor", "cleanup_reconciler", "triggers"):
        env[f"PREFECT_SERVER_SERVICES_{name.upper()}_ENABLED"] = "false"
    url = f"http://{HOST}:{port}/api"
    command = [str(BIN / "prefect"), "server", "start", "--host", HOST, "--port", str(port), "--no-ui", "--analytics-off"]
    return Service("prefect server", command, env, folder / "prefect-server.log", http_ok(f"{url}/health")), {"PREFECT_API_URL": url}


def s3_server(folder: Path) -> tuple[Service, dict[str, str]]:
    """moto's standalone S3-compatible server, in memory. Returns it and the standard AWS
    variables a client (boto3, pyarrow, s3fs, DVC, Ray, MLflow) needs to reach it."""
    port = free_port()
    client = {"AWS_ENDPOINT_URL": f"http://{HOST}:{port}", "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
              "AWS_DEFAULT_REGION": "us-east-1"}
    command = [str(BIN / "moto_server"), "-H", HOST, "-p", str(port)]
    return Service("moto s3 server", command, {**os.environ, **client}, folder / "moto-server.log", http_ok(f"{client['AWS_ENDPOINT_URL']}/moto-api/")), client


def create_bucket(name: str, env: dict[str, str]) -> str:
    """A new bucket on the endpoint `env` names; returns its s3:// URI."""
    import boto3

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"]).create_bucket(Bucket=name)
    return f"s3://{name}"


def mlflow_server(folder: Path, artifacts: str | None = None, extra_env: dict[str, str] | None = None) -> tuple[Service, dict[str, str]]:
    """`mlflow server` with a sqlite store in `folder` and proxied artifacts in `artifacts` (a
    folder or an s3:// URI; `extra_env` names its endpoint): clients upload artifacts through the
    server, as they would to a shared one. Returns it and its client env."""
    port = free_port()
    command = [str(BIN / "mlflow"), "server", "--host", HOST, "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", artifacts or str(folder / "artifacts")]
    url = f"http://{HOST}:{port}"
    env = {**os.environ, **(extra_env or {}), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no huey job consumers (GenAI scorers): five idle processes less
    return Service("mlflow server", command, env, folder / "mlflow-server.log", http_ok(f"{url}/health")), {"MLFLOW_TRACKING_URI": url}


def ray_client_env(address: str, token: str) -> dict[str, str]:
    """What a driver needs to join the head: its address and the cluster's token (Ray >= 2.59
    turns token authentication on for clusters started with `ray start`)."""
    return {"RAY_ADDRESS": address, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}


def ray_head(folder: Path, num_cpus: int = 2) -> tuple[Service, dict[str, str]]:
    """`ray start --head --block`, joined at 127.0.0.1, with a fresh token (nothing written to
    ~/.ray); ready once a driver can connect. Returns it and its client env."""
    port = free_port()
    client = ray_client_env(f"{HOST}:{port}", secrets.token_hex(16))
    env = {**os.environ, **client}
    env.pop("RAY_ADDRESS")
    # Its own temp dir (short: Ray's socket paths must fit 107 bytes), so its address file does not
    # become /tmp/ray/ray_current_cluster, which every later address-less ray.init() would try.
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-head-", dir="/tmp"))
    command = [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}",
               "--include-dashboard=false", "--disable-usage-stats"]

    def connects() -> bool:
        probe = subprocess.run([sys.executable, "-c", "import ray; ray.init(log_to_driver=False); ray.shutdown()"],
                               env={**os.environ, **client}, capture_output=True, timeout=120)
        return probe.returncode == 0

    return Service("ray head", command, env, folder / "ray-head.log", connects, scratch=temp_dir), client


def ray_worker_node(folder: Path, client: dict[str, str], num_cpus: int = 1) -> Service:
    """A second node joining the head that `client` names (`ray start --address --block`, its own
    raylet, object store and temp dir), as a worker machine of a cluster would; ready once the
    head counts it among its alive nodes."""
    env = {**os.environ, **client}
    env.pop("RAY_ADDRESS")
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-node-", dir="/tmp"))
    command = [str(BIN / "ray"), "start", "--block", f"--address={client['RAY_ADDRESS']}", f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}",
               "--disable-usage-stats"]

    def joined() -> bool:
        probe = subprocess.run([sys.executable, "-c", "import ray; ray.init(log_to_driver=False); print(sum(node['Alive'] for node in ray.nodes()))"],
                               env={**os.environ, **client}, capture_output=True, text=True, timeout=120)
        return probe.returncode == 0 and probe.stdout.strip().splitlines()[-1:] == ["2"]

    return Service("ray worker node", command, env, folder / "ray-node.log", joined, scratch=temp_dir)
