import json

from flows.cli import main


def test_model_summary_prints_json(capsys):
    assert main(["model-summary", "--preset", "smoke", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["preset"] == "smoke"
    assert summary["unet_training_with_experts"] > summary["unet_inference_merged"] > 0
