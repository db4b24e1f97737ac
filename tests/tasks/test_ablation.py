"""ablation: the rows of Tables 2 and 5 trained by train_unet's recipe and scored by evaluate, on a
tiny project (fixture-video clips, a moving-blob latent cache of the same video ids, a tiny
TCM-VAE); one table in metrics/ablation.json that `dvc metrics show` lists; every row's export
loads as the architecture it trained and generates."""

import json
import subprocess
import sys

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from tasks.config.params import ABLATION_ROWS, AblationParams, CacheLatentsParams, EvaluateParams, Params, ParamsError, TrainUnetParams
from tasks.inference.generation import VideoGenerator
from tasks.inference.models import load_unet
from tasks.preprocessing.synthetic_latents import synthetic_cache
from tasks.stages import ablation as ablation_stage
from tests.conftest import REPO, write_fixture_clips, write_tiny_models


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablation")
    write_fixture_clips(root / "data" / "clips")  # videos v0, v1, v2, two clips each
    synthetic_cache(root / "data" / "latents", shards=1, clips_per_shard=12, videos=3)
    write_tiny_models(root)  # models/decoder: the TCM-VAE every row is decoded with
    (root / "ablation").mkdir()
    (root / "ablation" / "dvc.yaml").write_bytes((REPO / "ablation" / "dvc.yaml").read_bytes())
    return root


def params_for(**ablation) -> Params:
    return Params(
        train_unet=TrainUnetParams(batch_size=2, image_batch_size=1, warmup_steps=1, lr=5e-4, checkpoint_every=100, sample_every=0, sample_count=1,
                                   sample_steps=2, shuffle_buffer=8, held_out_share=0.34),
        cache_latents=CacheLatentsParams(smoke_vae_fit_steps=0),
        evaluate=EvaluateParams(protocols="heldout", num_videos=2, steps=2, batch_size=2, sample_count=0, num_workers=1),
        ablation=AblationParams(**ablation),
    )


@pytest.fixture(scope="module")
def ran(project, ray_session):
    """The stage's main() on two rows: the full model and Table 2's baseline (no MEC, no MoE)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(project)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
        ablation_stage.main(params_for(rows="full,baseline", steps=3))
        yield project, json.loads((project / "reports" / "ablation.json").read_text())


def test_every_row_trains_its_architecture_and_lands_in_one_table(ran):
    project, report = ran
    metrics = json.loads((project / "metrics" / "ablation.json").read_text())
    assert set(metrics) == {"comparable", "steps", "seeds", "full", "baseline"}
    assert metrics["comparable"] is False and metrics["steps"] == 3 and metrics["seeds"] == 1
    full, baseline = metrics["full"], metrics["baseline"]
    assert baseline["parameters"] < full["parameters"]  # the switched-off paths and experts are absent, not idle
    for row in (full, baseline):
        assert row["fvd"] > 0 and -1 <= row["frame_consistency"] <= 1 and -1 <= row["clipsim"] <= 1 and np.isfinite(row["loss"])
        assert not any(key.endswith("_spread") for key in row)  # one seed: no spread to report
    assert [(run["row"], run["seed"], run["steps"]) for run in report["runs"]] == [("full", 0, 3), ("baseline", 0, 3)]
    assert report["runs"][1]["architecture"] == {"mec_paths": "", "spatial_experts": 1, "temporal_experts": 1}
    heldout = report["runs"][0]["protocols"]["heldout"]
    assert heldout["generated_videos"] == 2 and heldout["real_videos"] == 2  # the held-out video's two clips

    # the table is on one MLflow run; each row's training and evaluation runs are its own
    client = MlflowClient()
    table_run = client.get_run(report["mlflow_run_id"])
    assert table_run.data.metrics["baseline/parameters"] == baseline["parameters"]
    names = {client.get_run(run_id).info.run_name for run in report["runs"] for run_id in run["mlflow_run_ids"].values()}
    assert any("ablation-baseline" in name for name in names) and "evaluate-ablation-full-seed0-smoke" in names


def test_every_row_loads_as_trained_and_generates(ran):
    project, report = ran
    generated = []
    for run in report["runs"]:
        folder = project / "models" / "ablation" / f"{run['row']}-seed{run['seed']}"
        assert json.loads((folder / "result.json").read_text())["figures"] == run["figures"]
        unet, preset = load_unet(folder / "unet")
        assert preset == "smoke" and sum(p.numel() for p in unet.parameters()) == run["parameters"]
        config = json.loads((folder / "unet" / "config.json").read_text())["unet"]
        assert (config["spatial_experts"], config["temporal_experts"]) == ((4, 2) if run["row"] == "full" else (1, 1))
        generator = VideoGenerator(folder / "unet", project / "models" / "decoder", project / "data" / "latents", CacheLatentsParams())
        generated.append(generator(["a blob moves"], [3], frames=4, height=64, width=64, steps=2, guidance_scale=3.0))
    assert all(video.shape == (1, 4, 64, 64, 3) and video.dtype == np.uint8 for video in generated)
    assert not np.array_equal(*generated)  # two architectures, two videos from the same seed


def test_dvc_metrics_show_lists_the_table(ran):
    project, _ = ran
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=project, check=True)
    shown = subprocess.run([sys.executable, "-m", "dvc", "metrics", "show", "--json"], cwd=project, capture_output=True, text=True, check=True)
    metrics = next(iter(json.loads(shown.stdout).values()))["data"]["metrics/ablation.json"]["data"]
    assert metrics["baseline"]["parameters"] < metrics["full"]["parameters"]


def test_the_table_averages_seeds_and_reports_their_spread():
    def record(row, seed, fvd, loss):
        return {"row": row, "seed": seed, "parameters": 10, "loss": loss, "figures": {"fvd": fvd}}

    table = ablation_stage.table([record("full", 0, 20.0, 0.3), record("full", 1, 24.0, 0.1), record("no_me", 0, 30.0, 0.2)])
    assert table["full"] == {"parameters": 10, "loss": 0.2, "loss_spread": 0.2, "fvd": 22.0, "fvd_spread": 4.0}
    assert table["no_me"] == {"parameters": 10, "loss": 0.2, "fvd": 30.0}


def test_row_names_are_valid_mlflow_metric_prefixes():
    from mlflow.utils.validation import _validate_metric_name

    for row in ABLATION_ROWS:
        _validate_metric_name(f"{row}/fvd")  # raises on a character MLflow refuses, such as '+'


def test_each_row_changes_only_its_own_keys():
    params = params_for(steps=7)
    for row, changes in ABLATION_ROWS.items():
        row_params = ablation_stage.row_params(params, row, seed=5)
        assert row_params.evaluate.decoder_table == ""  # rows differ in the UNet: one decoder scores them
        changed = row_params.train_unet
        assert (changed.steps, changed.seed) == (7, 5)
        differing = {key for key in ("mec_paths", "spatial_experts", "temporal_experts") if getattr(changed, key) != getattr(params.train_unet, key)}
        assert differing == set(changes), row
        assert changed.lr == params.train_unet.lr and changed.batch_size == params.train_unet.batch_size


@pytest.mark.parametrize(("values", "message"), [
    ({"rows": "full,no_se"}, "ablation.rows: 'no_se' is not one of"),
    ({"rows": "full,full"}, "names a row twice"),
    ({"seeds": "0,x"}, "ablation.seeds: '0,x' must be comma-separated"),
    ({"steps": 0}, "ablation.steps"),
])
def test_a_bad_ablation_section_names_the_key(values, message):
    with pytest.raises(ParamsError, match=message):
        AblationParams(**values)
