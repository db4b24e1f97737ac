"""Promotion through the MLflow registry: the first model becomes champion, a worse one does not
move the alias, a better one does, and every version carries the decision and its reason."""

import json

import pytest
from mlflow import MlflowClient

from tasks.operations.lineage import start_run
from tasks.operations.promotion import ALIAS, promote_if_better


@pytest.fixture
def client(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return MlflowClient(uri), uri


def evaluated_model(tmp_path, client, uri, tag: str):
    """An evaluation run with something logged as its model: what is registered does not change
    the decision (tests/flows/test_registration.py registers the real pyfunc video model)."""
    folder = tmp_path / tag / "video_model"
    folder.mkdir(parents=True)
    (folder / "MLmodel").write_text(f"artifact_path: video_model\nrun_tag: {tag}\n")
    run_id = start_run(client, uri, f"evaluate-{tag}", {})
    client.log_artifacts(run_id, str(folder), "video_model")
    return run_id, f"{client.get_run(run_id).info.artifact_uri}/video_model"


def test_only_a_better_model_moves_the_champion(tmp_path, client):
    client, uri = client
    first = evaluated_model(tmp_path, client, uri, "first")
    decision = promote_if_better(client, "versvideo", *first, metric="heldout/fvd", value=120.0, lower_is_better=True)
    assert decision.promoted and str(client.get_model_version_by_alias("versvideo", ALIAS).version) == "1"

    worse = evaluated_model(tmp_path, client, uri, "worse")
    decision = promote_if_better(client, "versvideo", *worse, metric="heldout/fvd", value=130.0, lower_is_better=True)
    assert not decision.promoted and decision.champion_version == "1"
    assert str(client.get_model_version_by_alias("versvideo", ALIAS).version) == "1"
    version = client.get_model_version("versvideo", "2")
    assert version.tags["promotion.promoted"] == "false" and "does not beat champion version 1's 120" in version.tags["promotion.reason"]

    better = evaluated_model(tmp_path, client, uri, "better")
    decision = promote_if_better(client, "versvideo", *better, metric="heldout/fvd", value=99.5, lower_is_better=True)
    assert decision.promoted and str(client.get_model_version_by_alias("versvideo", ALIAS).version) == "3"
    assert json.loads(client.get_run(better[0]).data.tags["promotion.decision"])["champion_value"] == 120.0


def test_higher_is_better_metrics_and_broken_values(tmp_path, client):
    client, uri = client
    promote_if_better(client, "m", *evaluated_model(tmp_path, client, uri, "a"), metric="heldout/clipsim", value=0.25, lower_is_better=False)
    assert not promote_if_better(client, "m", *evaluated_model(tmp_path, client, uri, "b"), metric="heldout/clipsim", value=0.2, lower_is_better=False).promoted
    assert promote_if_better(client, "m", *evaluated_model(tmp_path, client, uri, "c"), metric="heldout/clipsim", value=0.3, lower_is_better=False).promoted
    with pytest.raises(ValueError, match="not a finite number"):
        promote_if_better(client, "m", *evaluated_model(tmp_path, client, uri, "d"), metric="heldout/clipsim", value=float("nan"), lower_is_better=False)
