"""Lineage tags: after a stage, every run it opened carries the input hashes DVC locked for it."""

from pathlib import Path

import mlflow
import torch
import yaml
from mlflow import MlflowClient

from tasks.operations.lineage import EXPERIMENT_KIND, MODEL_TRAINING_VIEW, cpu_model, lineage_tags, record_stage, start_run, ui_route


def write_lock(folder, latents_md5: str) -> None:
    lock = {"schema": "2.0", "stages": {"train_unet": {"cmd": "versvideo stage train_unet", "deps": [
        {"path": "data/latents", "md5": latents_md5, "size": 10, "nfiles": 2},
        {"path": "tasks/stages/train_unet.py", "md5": "code", "size": 1},
    ]}}}
    (folder / "dvc.lock").write_text(yaml.safe_dump(lock))


def test_a_stages_nested_runs_get_the_hashes_dvc_locked_for_this_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train_unet": {"cmd": "versvideo stage train_unet", "deps": ["data/latents"]}}}))
    write_lock(tmp_path, "previous.dir")  # what the last run locked
    client = MlflowClient(uri)
    stage_run = start_run(client, uri, "stage:train_unet", {})
    monkeypatch.setenv("VERSVIDEO_MLFLOW_PARENT_RUN_ID", stage_run)
    tags = lineage_tags("train_unet")  # the training run starts before DVC locks the new inputs
    assert tags["dvc.dep.data/latents"] == "previous.dir" and "dvc.dep.tasks/stages/train_unet.py" not in tags
    # the machine, since the floats (and the cache's bytes) depend on it
    assert tags["machine.torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability() and tags["machine.torch"] == torch.__version__
    assert tags["machine.cpu"] not in ("", "unknown") and tags["machine.torch_threads"] == str(torch.get_num_threads())
    training_run = start_run(client, uri, "train", tags)
    other_stage = start_run(client, uri, "stage:decode", {})

    write_lock(tmp_path, "current.dir")  # DVC locks this run's inputs once the stage exits
    record_stage(client, stage_run, "train_unet", seconds=1.5, ran=True)
    for run_id in (stage_run, training_run):
        assert client.get_run(run_id).data.tags["dvc.dep.data/latents"] == "current.dir"
    assert "dvc.dep.data/latents" not in client.get_run(other_stage).data.tags
    stage = client.get_run(stage_run)
    assert [(d.dataset.name, d.dataset.digest) for d in stage.inputs.dataset_inputs] == [("data/latents", "current.dir")]
    assert stage.data.tags["dvc.ran"] == "true" and stage.data.metrics["stage_seconds"] == 1.5


def test_cpu_model_reads_linux_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13 64-Core Processor\n")
    assert cpu_model(cpuinfo) == "AMD EPYC 7B13 64-Core Processor"
    assert cpu_model(tmp_path / "absent")  # not Linux: platform's answer, never empty


def test_runs_carry_mlflows_standard_tags_in_a_model_training_experiment(tmp_path):
    """create_run alone set no mlflow.user or source tags, and the UI opened the untagged
    experiment as GenAI evaluation runs."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.get_run(start_run(client, uri, "pipeline", {"git_commit": "abc"}))
    assert {"mlflow.user", "mlflow.source.name", "mlflow.source.type"} <= set(run.data.tags) and run.data.tags["git_commit"] == "abc"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND[0]] == "custom_model_development"
    client.delete_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND[0])  # as an older version left it
    start_run(client, uri, "pipeline", {})
    assert client.get_experiment(experiment.experiment_id).tags[EXPERIMENT_KIND[0]] == "custom_model_development"


def test_the_ui_route_asks_for_the_model_training_view_the_installed_ui_knows():
    """The MLflow 3.17 UI opens experiments in GenAI mode whatever their kind tag says; the route we
    print carries the query parameter its bundle reads. Checked against the installed bundle, so an
    MLflow upgrade that renames the parameter fails here rather than in a user's browser."""
    assert ui_route("7") == f"#/experiments/7?{MODEL_TRAINING_VIEW}"
    assert ui_route("7", "abc") == f"#/experiments/7/runs/abc?{MODEL_TRAINING_VIEW}"
    key, value = MODEL_TRAINING_VIEW.split("=")
    bundle = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    sources = [path.read_text(errors="ignore") for path in bundle.glob("*.js")]
    assert any(f'get("{key}")' in text and f'"{value}"' in text for text in sources)
