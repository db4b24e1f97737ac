"""Heavy shards in object storage (tasks/storage/shard_store.py), against a real S3 endpoint on
127.0.0.1 (moto's server, the session's `object_store`): decode and cache_latents on the real
fixture videos write into the bucket the same bytes they write into a local folder, named by what
they are, and leave only a manifest in the output folder; every reader (the clip and latent
datasets training streams, read_clips, the smoke VAE fit's digest) gives what it gives on local
files; a rerun finds its latent shards in the bucket and encodes none; a missing object or an
unreachable storage is an error naming VERSVIDEO_DATA_STORAGE."""

import hashlib
import json

import boto3
import numpy as np
import pandas as pd
import pytest

from model.weights import file_digest
from tasks.inference.encoders import encoder_info
from tasks.preprocessing.clips import decode_clips
from tasks.preprocessing.latents import cache_latents
from tasks.storage.clip_shards import clip_dataset, read_clips
from tasks.storage.clip_shards import shard_name as clip_shard_name
from tasks.storage.latent_shards import latent_clip_dataset, latent_dataset, read_latent_shard, shard_locations
from tasks.storage.latent_shards import shard_name as latent_shard_name
from tasks.storage.object_store import StorageError
from tasks.storage.shard_store import DATA_STORAGE_VARIABLE, MANIFEST, data_storage, read_manifest, read_shard_bytes, shard_location, shards_digest
from tests.services import free_port
from tests.tasks.conftest import FIXTURE_DECODE, FIXTURE_ENCODERS

@pytest.fixture(scope="module")
def decoded(fixture_videos, fixture_kept, clips_dir, object_store, tmp_path_factory):
    """The fixture videos decoded into the bucket (the output folder then holds the index and
    shards.json only), beside the session's local decode of the same kept rows."""
    storage = f"{object_store['bucket']}/data-storage-{tmp_path_factory.mktemp('x').name}"
    out = tmp_path_factory.mktemp("bucket") / "clips"
    index, _ = decode_clips(fixture_kept, FIXTURE_DECODE, out, fixture_videos, storage)
    index.to_parquet(out / "index.parquet", index=False)
    pd.testing.assert_frame_equal(index, pd.read_parquet(clips_dir / "index.parquet"))
    return {"local": clips_dir, "bucket": out}, storage, index


def test_decode_into_the_bucket_stores_the_local_shards_bytes_under_their_sha256(decoded):
    folders, storage, index = decoded
    names = [clip_shard_name(shard) for shard in range(3)]
    assert sorted(path.name for path in folders["bucket"].iterdir()) == ["index.parquet", MANIFEST]  # no shard on the disk
    manifest = read_manifest(folders["bucket"])
    assert manifest["storage"] == storage and sorted(manifest["shards"]) == names
    bucket, prefix = storage.removeprefix("s3://").split("/", 1)
    s3 = boto3.client("s3")
    for name in names:
        local = (folders["local"] / name).read_bytes()
        entry = manifest["shards"][name]
        assert entry == {"object": f"{hashlib.sha256(local).hexdigest()}.npy", "sha256": hashlib.sha256(local).hexdigest(), "bytes": len(local)}
        assert s3.get_object(Bucket=bucket, Key=f"{prefix}/shards/{entry['object']}")["Body"].read() == local
    # the figure the smoke VAE fit's stamp and the latent fingerprints take from the shards
    assert shards_digest(folders["bucket"], names) == shards_digest(folders["local"], names) == file_digest(*(folders["local"] / name for name in names))
    np.testing.assert_array_equal(read_clips(folders["bucket"], index.iloc[::-1]), read_clips(folders["local"], index.iloc[::-1]))
    streamed = {where: sorted(clip.tobytes() for batch in clip_dataset(folder, index, seed=0).iter_batches(batch_size=None) for clip in batch["frames"])
                for where, folder in folders.items()}  # sorted: read tasks finish in any order
    assert len(streamed["bucket"]) == 6 and streamed["bucket"] == streamed["local"]


@pytest.fixture(scope="module")
def cached_in_bucket(decoded, tmp_path_factory):
    folders, storage, index = decoded
    out = tmp_path_factory.mktemp("latents-bucket")
    status = cache_latents(index, FIXTURE_ENCODERS, encoder_info(FIXTURE_ENCODERS), folders["bucket"], out, storage=storage)
    index.to_parquet(out / "index.parquet", index=False)
    return out, status


def test_latent_cache_in_the_bucket_holds_the_local_caches_bytes_and_training_reads_them(decoded, cached, cached_in_bucket):
    folders, storage, index = decoded
    (_, local_status, local, _), (bucket, bucket_status) = cached, cached_in_bucket
    assert list(local_status["status"]) == list(bucket_status["status"]) == ["encoded"] * 3
    assert sorted(path.name for path in bucket.iterdir()) == ["index.parquet", MANIFEST]
    manifest = read_manifest(bucket)
    for shard in range(3):
        name = latent_shard_name(shard)
        local_bytes = (local / name).read_bytes()
        # the same fingerprint (the clip shards' digest is the same), so the same bytes
        assert manifest["shards"][name]["sha256"] == hashlib.sha256(local_bytes).hexdigest()
        assert read_shard_bytes(shard_location(bucket, name)) == local_bytes
        np.testing.assert_array_equal(read_latent_shard(shard_location(bucket, name))["latents"], read_latent_shard(local / name)["latents"])
    assert all(location.startswith(f"{storage}/shards/") for location in shard_locations(bucket, range(3)))

    def epoch(dataset, columns: tuple[str, ...]) -> list[tuple[bytes, ...]]:
        """One epoch's rows as bytes, sorted: read tasks finish in any order."""
        batches = list(dataset.iter_batches(batch_size=None))
        return sorted(zip(*([row.tobytes() for batch in batches for row in batch[column]] for column in columns)))

    assert epoch(latent_dataset(bucket, seed=1), ("latents", "context")) == epoch(latent_dataset(local, seed=1), ("latents", "context"))
    paired = {where: epoch(latent_clip_dataset(latents, folders[where], seed=1, exclude_videos=frozenset()), ("latents", "frames"))
              for where, latents in (("local", local), ("bucket", bucket))}
    assert len(paired["bucket"]) == 6 and paired["bucket"] == paired["local"]


def test_a_rerun_into_a_new_folder_finds_every_latent_shard_in_the_bucket(decoded, cached_in_bucket, tmp_path):
    folders, storage, index = decoded
    status = cache_latents(index, FIXTURE_ENCODERS, encoder_info(FIXTURE_ENCODERS), folders["bucket"], tmp_path, storage=storage)
    assert list(status["status"]) == ["skipped"] * 3
    assert json.loads((tmp_path / MANIFEST).read_text()) == read_manifest(cached_in_bucket[0])


def test_a_shard_missing_from_the_bucket_or_the_manifest_is_an_error_naming_what_to_do(decoded, tmp_path):
    folders, storage, _ = decoded
    with pytest.raises(FileNotFoundError, match=r"names no shard clips-00007.npy: rerun the stage"):
        shard_location(folders["bucket"], clip_shard_name(7))
    with pytest.raises(FileNotFoundError, match=rf"{storage}/shards/0000.npy: shard not found: .*--force STAGE.*{DATA_STORAGE_VARIABLE}"):
        read_shard_bytes(f"{storage}/shards/0000.npy")


def test_an_unreachable_data_storage_fails_in_seconds_naming_the_variable_and_endpoint(monkeypatch, object_store):
    monkeypatch.setenv(DATA_STORAGE_VARIABLE, f"{object_store['bucket']}/data")
    assert data_storage() == f"{object_store['bucket']}/data"
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    with pytest.raises(StorageError, match=rf"{DATA_STORAGE_VARIABLE}: .*{dead} \(AWS_ENDPOINT_URL\) cannot be reached"):
        data_storage()
    monkeypatch.setenv(DATA_STORAGE_VARIABLE, "")
    assert data_storage() is None  # unset: the shards stay in their output folders


def test_evaluations_real_statistics_go_to_the_data_storage_and_a_pulled_manifest_finds_them(object_store, tmp_path, monkeypatch):
    """evaluate's cache of real-video statistics (data/eval_stats, DVC-persisted) follows the
    shards: an object in the bucket, named by the inputs it was computed from, and shards.json in
    the folder; a clone that pulled the folder reads it without the variable set."""
    from eval.frechet import FeatureStats
    from eval.video_features import I3D_FEATURES
    from tasks.evaluation.scoring import load_real_stats, save_real_stats, stats_name

    rng = np.random.default_rng(0)
    fvd = FeatureStats(I3D_FEATURES)
    fvd.update(rng.normal(size=(5, I3D_FEATURES)))
    real = {"fvd": fvd, "clipsim_frames": rng.random((5, 4)), "consistency_pairs": rng.random((5, 3)), "skipped": 1, "offsets": {"v1": 3, "v2": 0}}
    key = {"dataset": "ucf101", "split": "test", "frames": 4}
    name = stats_name(key)
    storage = f"{object_store['bucket']}/eval-stats-{tmp_path.name}"
    monkeypatch.setenv(DATA_STORAGE_VARIABLE, storage)
    folder = tmp_path / "clone-a" / "data" / "eval_stats"
    save_real_stats(folder, name, real, key)
    assert [path.name for path in folder.iterdir()] == [MANIFEST]
    entry = read_manifest(folder)["shards"][name]
    stored = read_shard_bytes(shard_location(folder, name))
    assert entry == {"object": name, "sha256": hashlib.sha256(stored).hexdigest(), "bytes": len(stored)}

    monkeypatch.delenv(DATA_STORAGE_VARIABLE)
    pulled = tmp_path / "clone-b" / "data" / "eval_stats"
    pulled.mkdir(parents=True)
    (pulled / MANIFEST).write_bytes((folder / MANIFEST).read_bytes())  # what `dvc pull` brings
    for where in (folder, pulled):
        loaded = load_real_stats(where, name)
        np.testing.assert_array_equal(loaded["fvd"].mean, fvd.mean)
        np.testing.assert_array_equal(loaded["fvd"].covariance, fvd.covariance)
        np.testing.assert_array_equal(loaded["clipsim_frames"], real["clipsim_frames"])
        assert loaded["skipped"] == 1 and loaded["offsets"] == real["offsets"]
    assert load_real_stats(pulled, stats_name({**key, "frames": 8})) is None  # other inputs: not computed yet

    local = tmp_path / "clone-c" / "data" / "eval_stats"  # no data storage: a file in the folder, as the demo keeps it
    save_real_stats(local, name, real, key)
    assert [path.name for path in local.iterdir()] == [name]
    np.testing.assert_array_equal(load_real_stats(local, name)["consistency_pairs"], real["consistency_pairs"])
