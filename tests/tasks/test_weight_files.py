"""Weight files are checked (exists, readable, format header) before any expensive work."""

import pytest
import torch
from safetensors.torch import save_file

from flows.cli import main as cli_main
from model.weights import WeightsError
from tasks.storage.weight_files import check_weight_file

KEY = "evaluate.i3d_weights"


def test_whole_weight_files_of_each_format_pass(tmp_path):
    tensors = {"conv.weight": torch.randn(4, 3, 3, 3), "conv.bias": torch.zeros(4)}
    save_file(tensors, tmp_path / "model.safetensors")
    torch.save(tensors, tmp_path / "zip.pt")
    torch.save(tensors, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "scripted.pt")
    for name in ("model.safetensors", "zip.pt", "legacy.pth", "scripted.pt"):
        check_weight_file(tmp_path / name, KEY)
    check_weight_file(tmp_path, "cache_latents.vae_weights", folder_ok=True)  # a diffusers folder


def test_broken_weight_files_are_named_with_their_key(tmp_path):
    save_file({"weight": torch.randn(64, 64)}, tmp_path / "whole.safetensors")
    whole = (tmp_path / "whole.safetensors").read_bytes()
    cases = {
        "truncated.safetensors": (whole[:-100], "truncated: its header names 16384 bytes of tensors, the file holds 16284"),
        "page.safetensors": (b"<html>404 Not Found</html>", "not a safetensors file"),
        "empty.safetensors": (b"", "not a safetensors file (0 bytes"),
        "garbled.safetensors": (whole[:8] + b"{not json" + whole[17:], "header is not valid JSON"),
        "page.pt": (b"<!DOCTYPE html>", "neither a safetensors file nor a torch.save file (it starts with b'<!DO')"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(WeightsError, match=None) as error:
            check_weight_file(tmp_path / name, KEY)
        assert message in str(error.value) and KEY in str(error.value), str(error.value)
    with pytest.raises(WeightsError, match=f"absent.pt: weight file not found; set {KEY}"):
        check_weight_file(tmp_path / "absent.pt", KEY)
    with pytest.raises(WeightsError, match=f"is a folder; set {KEY} to a weight file"):
        check_weight_file(tmp_path, KEY)


def test_filter_names_a_bad_clip_checkpoint_before_probing_any_video(tmp_path, monkeypatch, capsys):
    """It used to be found only after every video was probed."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("preset: smoke\nfilter:\n  clip_weights: clip.safetensors\n")
    (tmp_path / "clip.safetensors").write_bytes(b"\x00" * 4)  # an interrupted download
    assert cli_main(["stage", "filter"]) == 1
    assert "clip.safetensors: not a safetensors file (4 bytes, header length -1); re-download or re-export it (filter.clip_weights)" in capsys.readouterr().err
    assert not (tmp_path / "data/filtered").exists()
