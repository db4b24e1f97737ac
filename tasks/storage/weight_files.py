"""Weight files checked before any expensive work: each path a params `*_weights` key (or a
trained model folder) names must exist, be readable and start like its format, so a typo, a
truncated download or an HTML error page is reported at once, naming the key, instead of after
an hour of probing or as a raw loader traceback.

Only headers are read: safetensors' 8-byte header length and JSON header (whose tensor offsets
must fit the file, which catches truncation); torch.save's zip or legacy-pickle signature.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from model.weights import WeightsError
from tasks.config.params import Params, require_pretrained_weights

MAX_SAFETENSORS_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header
ZIP_SIGNATURE = b"PK\x03\x04"  # torch.save since 1.6, TorchScript archives
PICKLE_PROTOCOL_OPCODE = 0x80  # the first byte of a legacy torch.save pickle (protocol 2+)


def check_weight_file(path: str | Path, key: str, folder_ok: bool = False) -> None:
    """Raise WeightsError unless `path` exists, is readable and has its format's header."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: weight file not found; set {key} to a local file (nothing is downloaded)")
    if path.is_dir():
        if not folder_ok:
            raise WeightsError(f"{path}: is a folder; set {key} to a weight file")
        return
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            if path.suffix == ".safetensors":
                _check_safetensors(path, handle, head, key)
            elif not (head.startswith(ZIP_SIGNATURE) or head[:1] == bytes([PICKLE_PROTOCOL_OPCODE])):
                raise WeightsError(f"{path}: neither a safetensors file nor a torch.save file (it starts with {head[:4]!r}); "
                                      f"is it a partial download or an error page? ({key})")
    except OSError as error:
        raise WeightsError(f"{path}: cannot be read ({error.strerror}); check its permissions ({key})") from None


def _check_safetensors(path: Path, handle, head: bytes, key: str) -> None:
    size = path.stat().st_size
    header_length = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 0 < header_length <= min(size - 8, MAX_SAFETENSORS_HEADER):
        raise WeightsError(f"{path}: not a safetensors file ({size} bytes, header length {header_length}); re-download or re-export it ({key})")
    try:
        header = json.loads(handle.read(header_length))
        data_end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError):
        raise WeightsError(f"{path}: its safetensors header is not valid JSON naming tensors; re-download or re-export it ({key})") from None
    if 8 + header_length + data_end > size:
        raise WeightsError(f"{path}: truncated: its header names {data_end} bytes of tensors, the file holds {size - 8 - header_length}; "
                              f"re-download or re-export it ({key})")


def require_weight_files(params: Params, section: str) -> None:
    """The weights policy (L and H need every pretrained file), then a header check of every
    `*_weights` file the section sets. cache_latents.vae_weights may be a diffusers folder."""
    values = getattr(params, section)
    if hasattr(values, "missing_weights"):  # sections whose pretrained networks are required at L/H
        require_pretrained_weights(params, section)
    for field in dataclasses.fields(values):
        path = getattr(values, field.name)
        if field.name.endswith("_weights") and path:
            check_weight_file(path, f"{section}.{field.name}", folder_ok=(section, field.name) == ("cache_latents", "vae_weights"))
