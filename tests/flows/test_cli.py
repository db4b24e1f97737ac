import importlib.metadata
import json

import pytest

import flows.pipeline
from flows.cli import main


def test_model_summary_prints_json(capsys):
    assert main(["model-summary", "--preset", "smoke", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["preset"] == "smoke"
    assert summary["unet_training_with_experts"] > summary["unet_inference_merged"] > 0


def test_version_is_the_installed_package_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"versvideo {importlib.metadata.version('versvideo')}"


def test_an_unknown_stage_is_refused_before_any_service_starts(capsys, monkeypatch):
    monkeypatch.setattr(flows.pipeline, "pipeline", lambda **kwargs: (_ for _ in ()).throw(AssertionError("the flow started")))
    assert main(["pipeline", "--stages", "filter,trian_unet"]) == 1
    assert "unknown stage(s) trian_unet; dvc.yaml has prepare, filter, decode" in capsys.readouterr().err
    assert main(["pipeline", "--force", "decodee"]) == 1
