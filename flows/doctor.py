"""`versvideo doctor [--preset L]`: what a run would need, checked without running a stage.

- params: the params file loads (with --preset: as `versvideo init --preset NAME` would write it);
- weights: every weight file each stage reads exists and has a sound header (the checks the
  stages themselves run first), and L/H have every pretrained file;
- services: the ones the environment names answer (MLFLOW_TRACKING_URI's /health,
  PREFECT_API_URL's /health, RAY_ADDRESS's port, the buckets of VERSVIDEO_RUN_STORAGE and
  VERSVIDEO_DATA_STORAGE); unset ones run
  locally and need nothing;
- raw data: data.videos_root and data.images, when they are in object storage, answer and hold
  something;
- devices: the GPUs torch sees, and the CPU count.

Each check prints one line; the exit status is 1 when any failed.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pyarrow.fs as pafs

from tasks.config.params import Params, ParamsError, load_params, write_preset
from tasks.storage.object_store import RUN_STORAGE_VARIABLE, StorageError, filesystem, is_uri, require_reachable
from tasks.storage.shard_store import DATA_STORAGE_VARIABLE
from tasks.storage.weight_files import require_weight_files

STAGES_WITH_WEIGHTS = ("filter", "cache_latents", "train_decoder", "train_controlnet", "evaluate")
TIMEOUT_S = 5.0


def doctor(params_file: Path, preset: str | None) -> bool:
    """Print one line per check; True when all passed."""
    results = []

    def check(name: str, run: Callable[[], str]) -> None:
        try:
            detail, ok = run(), True
        except (OSError, ValueError, ParamsError, StorageError, urllib.error.URLError) as error:
            detail, ok = str(error), False
        print(f"{'ok  ' if ok else 'FAIL'}  {name}: {detail}", flush=True)
        results.append(ok)

    params: list[Params] = []
    check("params", lambda: describe_params(params_file, preset, params))
    if params:
        for stage in STAGES_WITH_WEIGHTS:
            check(f"weights of {stage}", lambda stage=stage: weights_of(params[0], stage))
        for key, location in (("data.videos_root", params[0].data.videos_root), ("data.images", params[0].data.images)):
            if is_uri(location):
                check(key, lambda location=location: raw_data_answers(location))
    for variable, probe in (("MLFLOW_TRACKING_URI", mlflow_answers), ("PREFECT_API_URL", prefect_answers), ("RAY_ADDRESS", ray_answers),
                            (RUN_STORAGE_VARIABLE, storage_answers), (DATA_STORAGE_VARIABLE, storage_answers)):
        check(variable, lambda variable=variable, probe=probe: probe(os.environ[variable]) if os.environ.get(variable) else "not set: runs locally")
    check("devices", devices)
    return all(results)


def describe_params(params_file: Path, preset: str | None, out: list[Params]) -> str:
    if preset:  # what `versvideo init --preset NAME` would write, checked on a copy
        with tempfile.TemporaryDirectory() as folder:
            copy = Path(folder) / "params.yaml"
            shutil.copy(params_file, copy)
            write_preset(copy, preset)
            out.append(load_params(copy))
    else:
        out.append(load_params(params_file))
    return f"{params_file} loads, preset {out[0].preset}" + (" (as `versvideo init --preset` would write it)" if preset else "")


def weights_of(params: Params, stage: str) -> str:
    require_weight_files(params, stage)
    files = [value for name, value in vars(getattr(params, stage)).items() if name.endswith("_weights") and value]
    if files:
        return f"{len(files)} file(s) sound"
    return "none set: seeded stand-ins (the smoke preset only)" if hasattr(getattr(params, stage), "missing_weights") else "none set (optional)"


def http_health(url: str) -> str:
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
        return f"{url} answers {response.status}"


def mlflow_answers(uri: str) -> str:
    if not uri.startswith(("http://", "https://")):
        return f"{uri}: a local store, nothing to reach"
    return http_health(f"{uri.rstrip('/')}/health")


def prefect_answers(url: str) -> str:
    return http_health(f"{url.rstrip('/')}/health")


def ray_answers(address: str) -> str:
    if address in ("auto", "local"):
        return f"{address}: found by ray.init on this machine"
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not port.isdigit():
        raise ValueError(f"{address}: expected HOST:PORT (the head node's GCS port, 6379 by default)")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT_S):
        return f"{host}:{port} accepts connections"


def storage_answers(location: str) -> str:
    if not is_uri(location):
        return f"{location}: a local folder (every node must see it)"
    require_reachable(location)
    return f"{location}: the bucket answers"


def raw_data_answers(location: str) -> str:
    require_reachable(location)
    fs, path = filesystem(location)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise StorageError(f"{location}: nothing there; upload the videos (or image shards) under it, or fix the param")
    return f"{location}: the bucket answers and holds it"


def devices() -> str:
    import torch  # here: the other checks should not wait for it

    gpus = [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]
    return f"{len(gpus)} GPU(s){': ' + ', '.join(gpus) if gpus else ''}; {os.cpu_count()} CPU(s)"
