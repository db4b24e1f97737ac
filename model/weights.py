"""Pretrained weights from local files, with errors that say which file and which key is wrong.

Only tensors are read: .safetensors files, or state dicts through `torch.load(weights_only=True)`
(never arbitrary pickles). `key` arguments are the names users set the path under (a params key),
so a missing file tells them what to change. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch


class WeightsError(ValueError):
    pass


def load_state_dict(path: str | Path, key: str) -> dict[str, torch.Tensor]:
    """A tensor state dict from a local file; `key` is the setting to name when it is missing."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weight file not found; set {key} to a local file (nothing is downloaded)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as error:  # truncated, corrupt or unreadable
            raise WeightsError(f"{path}: not a readable safetensors file ({error}); re-download or re-export it ({key})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a pickle with objects other than tensors, or not a torch file at all
        raise WeightsError(f"{path}: not a tensor state dict torch.load(weights_only=True) can read ({error}); convert it to .safetensors") from None
    for wrapper in ("state_dict", "model"):  # common checkpoint wrappers (Lightning, DDP scripts)
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return {name.removeprefix("module."): tensor for name, tensor in state.items() if isinstance(tensor, torch.Tensor)}


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path, source_names: dict[str, str] | None = None) -> None:
    """load_state_dict(strict) with an error that names the file and the first bad key.

    source_names maps a module key to the key it came from in the file, when the file's layout
    was converted first (the error then names the key as it is written in the file)."""
    source_names = source_names or {}

    def named(name: str) -> str:
        return f"{source_names[name]!r} (-> {name!r})" if name in source_names else repr(name)

    expected = module.state_dict()
    for name, tensor in expected.items():
        if name not in state:
            raise WeightsError(f"{path}: missing key {name!r} (is this a checkpoint for this architecture?)")
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise WeightsError(f"{path}: key {named(name)} has shape {tuple(state[name].shape)}, the model expects {tuple(tensor.shape)}")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise WeightsError(f"{path}: unexpected key {named(unexpected[0])} (is this a checkpoint for this architecture?)")
    module.load_state_dict(state, strict=True)


def file_sha256(path: str | Path) -> str:
    """The file's sha256, as `sha256sum` prints it."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def file_digest(*paths: str | Path) -> str:
    """sha256 over the bytes of the given files, in order (identifies the weights a cache used)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()
