"""`versvideo doctor`: params, weight files, services and devices checked without running a stage,
against the session's real MLflow and Prefect servers, its S3 server (the buckets, and a
data.videos_root and data.images in it) and a port nothing listens on."""

import socket

import boto3

from flows.cli import main


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_doctor_names_each_problem_and_what_answers(tmp_path, monkeypatch, capsys, mlflow_api, prefect_api, object_store):
    (tmp_path / "clip.safetensors").write_bytes(b"<html>404 Not Found</html>")
    boto3.client("s3").put_object(Bucket=object_store["bucket"].removeprefix("s3://"), Key="doctor-images/00000.tar", Body=b"")
    (tmp_path / "params.yaml").write_text(f"preset: smoke\nfilter:\n  clip_weights: clip.safetensors\n"
                                          f"data:\n  videos_root: {object_store['bucket']}/no-videos-here\n  images: {object_store['bucket']}/doctor-images\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_api["MLFLOW_TRACKING_URI"])
    monkeypatch.setenv("PREFECT_API_URL", prefect_api["PREFECT_API_URL"])
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{free_port()}")  # no head there
    monkeypatch.setenv("VERSVIDEO_RUN_STORAGE", "s3://no-such-bucket/runs")  # on the session's S3 server
    monkeypatch.setenv("VERSVIDEO_DATA_STORAGE", f"{object_store['bucket']}/data")
    assert main(["doctor"]) == 1
    lines = {line[6:].partition(":")[0]: line for line in capsys.readouterr().out.splitlines()}
    assert lines["weights of filter"].startswith("FAIL") and "clip.safetensors: not a safetensors file" in lines["weights of filter"]
    assert lines["weights of cache_latents"].startswith("ok") and "seeded stand-ins" in lines["weights of cache_latents"]
    assert lines["MLFLOW_TRACKING_URI"].startswith("ok") and "answers 200" in lines["MLFLOW_TRACKING_URI"]
    assert lines["PREFECT_API_URL"].startswith("ok") and "answers 200" in lines["PREFECT_API_URL"]
    assert lines["RAY_ADDRESS"].startswith("FAIL")
    assert lines["VERSVIDEO_RUN_STORAGE"].startswith("FAIL") and f"'no-such-bucket' does not exist at endpoint {object_store['AWS_ENDPOINT_URL']}" in lines["VERSVIDEO_RUN_STORAGE"]
    assert lines["VERSVIDEO_DATA_STORAGE"] == "ok    VERSVIDEO_DATA_STORAGE: s3://versvideo-tests/data: the bucket answers"
    assert lines["devices"].startswith("ok") and "CPU(s)" in lines["devices"]
    assert lines["data.videos_root"] == f"FAIL  data.videos_root: {object_store['bucket']}/no-videos-here: nothing there; upload the videos (or image shards) under it, or fix the param"
    assert lines["data.images"] == f"ok    data.images: {object_store['bucket']}/doctor-images: the bucket answers and holds it"

    (tmp_path / "params.yaml").write_text("preset: smoke\n")
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setenv("VERSVIDEO_RUN_STORAGE", f"{object_store['bucket']}/runs")
    assert main(["doctor"]) == 0
    assert "ok    VERSVIDEO_RUN_STORAGE: s3://versvideo-tests/runs: the bucket answers" in capsys.readouterr().out
    assert main(["doctor", "--preset", "L"]) == 1  # as `versvideo init --preset L` would set it: every pretrained file needed
    out = capsys.readouterr().out
    assert "FAIL  weights of cache_latents: cache_latents.vae_weights, cache_latents.text_weights: required for preset L" in out
    assert "ok    params: params.yaml loads, preset L" in out and not (tmp_path / "params.yaml").read_text().count("L")
