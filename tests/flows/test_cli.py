import difflib
import importlib.metadata
import json
from pathlib import Path

import pytest

import flows.pipeline
from flows.cli import main
from tasks.config.params import load_params


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


def test_pipeline_set_writes_the_params_dvc_records_and_refuses_bad_ones_before_the_flow(tmp_path, capsys, monkeypatch):
    """`versvideo pipeline -S key=value` writes the value into params.yaml (as `dvc exp run -S`
    does, so dvc.lock and `dvc params diff` record it), typed and with its comment kept; a bad
    value, an unknown key or the preset is refused (exit 2) before the flow starts, the file
    untouched."""
    repo_params = Path(__file__).resolve().parents[2] / "params.yaml"
    (tmp_path / "params.yaml").write_bytes(repo_params.read_bytes())
    (tmp_path / "dvc.yaml").write_bytes(repo_params.with_name("dvc.yaml").read_bytes())
    monkeypatch.chdir(tmp_path)
    ran = []
    monkeypatch.setattr(flows.pipeline, "pipeline", lambda **kwargs: ran.append(kwargs) or [])
    assert main(["pipeline", "-S", "train_unet.steps=300", "-S", "train_unet.lr=2e-4"]) == 0 and len(ran) == 1
    assert "params.yaml: set train_unet.lr, train_unet.steps" in capsys.readouterr().out
    written = (tmp_path / "params.yaml").read_text()
    changed = [line for line in difflib.unified_diff(repo_params.read_text().splitlines(), written.splitlines(), lineterm="", n=0) if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    assert [line.split("#")[0].rstrip() for line in changed] == ["-  steps: 1500", "+  steps: 300", "-  lr: 0.001", "+  lr: 0.0002"]
    assert load_params(tmp_path / "params.yaml").train_unet.lr == 2e-4
    for bad, message in ((["-S", "train_unet.steps=-1"], "train_unet.steps"), (["-S", "train_unet.stpes=3"], "did you mean 'steps'"),
                         (["-S", "preset=L"], "versvideo init --preset L")):
        assert main(["pipeline", *bad]) == 2
        assert message in capsys.readouterr().err
    assert (tmp_path / "params.yaml").read_text() == written and len(ran) == 1
