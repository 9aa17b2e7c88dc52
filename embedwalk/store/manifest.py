"""On-disk format of an activation store: safetensors shards, a JSON manifest, atomic writes.

A store directory holds ``manifest.json``, ``shard-NNNNN.safetensors`` files and, once complete,
``metadata.parquet`` (or ``metadata.jsonl`` without pyarrow). Shards are plain safetensors files
that any safetensors reader opens; embedwalk writes them itself (header + raw tensor bytes)
so a shard is streamed to disk once, hashed on the way, without an extra in-memory copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from embedwalk.errors import EmbedwalkError

FORMAT = "embedwalk-activation-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_ST_NAME = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.int32: "I32", torch.int64: "I64"}
# numpy has no bfloat16: such bytes are mapped as int16 and re-viewed in torch, still zero-copy.
_NP_VIEW = {"BF16": np.int16, "F16": np.float16, "F32": np.float32, "I32": np.int32, "I64": np.int64}
_TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "I32": torch.int32, "I64": torch.int64}


def storage_dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        name = str(name).replace("torch.", "")
    if name not in DTYPES:
        raise EmbedwalkError(f"storage dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems refuse opening directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON so that a reader (or a crash) sees either the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True, default=_jsonable)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return x.item()
    raise TypeError(f"metadata value {x!r} of type {type(x).__name__} is not JSON-serialisable")


def dumps(obj) -> str:
    try:
        return json.dumps(obj, sort_keys=True, default=_jsonable, separators=(",", ":"))
    except TypeError as e:
        raise EmbedwalkError(f"{e}; metadata must be numbers, strings, booleans, None, lists or dicts") from e


def read_manifest(directory: Path) -> Optional[dict]:
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EmbedwalkError(
            f"{path} is not valid JSON ({e}); the store's manifest is damaged, and without it the shards cannot be "
            "checked. Rerun the cache command into a new directory"
        ) from e
    except (OSError, UnicodeDecodeError) as e:
        raise EmbedwalkError(f"{path} cannot be read ({e}); rerun the cache command into a new directory") from e
    missing = [k for k in ("config", "shards", "hooks", "d_model", "dtype", "complete") if not isinstance(manifest, dict) or k not in manifest]
    if missing and isinstance(manifest, dict) and manifest.get("format") == FORMAT:
        raise EmbedwalkError(f"{path} lacks {missing}; the store's manifest is damaged. Rerun the cache command into a new directory")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise EmbedwalkError(f"{path} is not an embedwalk activation-store manifest")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise EmbedwalkError(f"{path} was written by a newer embedwalk (format {manifest['format_version']}); upgrade embedwalk")
    return manifest


def config_hash(config: dict) -> str:
    return hashlib.sha256(dumps(config).encode()).hexdigest()


def model_identity(adapter) -> dict:
    """What the stored vectors' meaning depends on: the model (the fingerprint of every
    parameter and buffer, :mod:`embedwalk.fingerprint`) and the residual basis its hook points
    live in (raw or processed weights). The one identity store manifests, tuned lenses and
    concept fits record; :func:`check_identity` compares two of them."""
    from embedwalk.adapter import adapt
    from embedwalk.basis import residual_basis

    adapter = adapt(adapter)
    cfg = adapter.cfg
    return {
        "name": str(getattr(cfg, "model_name", None) or type(adapter.model).__name__),
        "class": type(adapter.model).__name__,
        "generation": adapter.generation,
        "n_layers": adapter.n_layers,
        "d_model": adapter.d_model,
        "d_vocab": adapter.d_vocab,
        "model_dtype": str(adapter.dtype).replace("torch.", ""),
        "fingerprint": adapter.fingerprint.to_json(),
        "residual_basis": residual_basis(adapter),
    }


def identity_verified(ident: Optional[dict]) -> bool:
    """Whether ``ident`` (a :func:`model_identity` record) carries a fingerprint; records
    written before embedwalk fingerprinted the whole model (``W_U_sha256`` only) do not."""
    from embedwalk.fingerprint import Fingerprint

    return isinstance(ident, dict) and Fingerprint.from_json(ident.get("fingerprint")) is not None


def model_mismatch(recorded: Optional[dict], now: Optional[dict]) -> Optional[str]:
    """How the model of identity ``now`` differs from the ``recorded`` one, in words, or None
    when they are the same model (or either side has no fingerprint: unverified, see
    :func:`identity_verified`). Sizes first, then the fingerprint's per-tensor digests."""
    from embedwalk.fingerprint import Fingerprint, describe_difference

    if not isinstance(recorded, dict) or not isinstance(now, dict):
        return None
    for key in ("d_model", "d_vocab", "n_layers"):
        if key in recorded and key in now and recorded[key] != now[key]:
            return f"{key} differs ({recorded[key]} recorded, {now[key]} now)"
    a, b = Fingerprint.from_json(recorded.get("fingerprint")), Fingerprint.from_json(now.get("fingerprint"))
    if a is None or b is None or a.digest == b.digest:
        return None
    return describe_difference(a, b)


def _raw(t: torch.Tensor) -> memoryview:
    if t.numel() == 0:  # a shard of prompts where no position was selected; memoryview cannot cast it
        return memoryview(b"")
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")


def write_shard(path: Path, tensors: dict, metadata: dict) -> tuple[int, str]:
    """Write a safetensors file to a temporary name, fsync, rename; return (bytes, sha256)."""
    header, offset = {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_NAME[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(len(blob)) % 8)  # data start 8-byte aligned, as safetensors recommends
    digest = hashlib.sha256()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as f:
        for piece in (struct.pack("<Q", len(blob)), blob, *(_raw(t) for t in tensors.values())):
            digest.update(piece)
            f.write(piece)
        f.flush()
        os.fsync(f.fileno())
        size = f.tell()
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return size, digest.hexdigest()


RECOVER = (
    "The store is damaged: check every shard with open_store(path, verify=True), delete the damaged shard and "
    "every later one, and rerun the same cache_activations call (or `embedwalk cache` command) into the same "
    "directory; it rewrites them byte-identically"
)


def damaged(path: Path, what: str) -> EmbedwalkError:
    """The error for an unreadable shard: names it and says how to recover."""
    return EmbedwalkError(f"shard {path} {what}. {RECOVER}")


def read_header(path: Path) -> tuple[dict, int]:
    """The safetensors header of ``path`` and the byte offset where tensor data starts."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise damaged(path, "is truncated (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > 100_000_000:
                raise damaged(path, f"has a damaged header (it claims {n} header bytes)")
            raw = f.read(n)
    except OSError as e:
        raise damaged(path, f"cannot be read ({e})") from e
    if len(raw) < n:
        raise damaged(path, "is truncated (header cut short)")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise damaged(path, f"has a damaged header (not valid JSON: {e})") from e
    if not isinstance(header, dict):
        raise damaged(path, "has a damaged header (not a JSON object)")
    return header, 8 + n


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def map_shard(path: Path) -> tuple[dict, dict]:
    """Memory-map a shard: zero-copy torch tensors over the file, and the header metadata."""
    header, start = read_header(path)
    meta = header.pop("__metadata__", {}) or {}
    mm = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: writable views, file never touched
    out = {}
    for name, info in header.items():
        try:
            s, e = info["data_offsets"]
            if start + e > mm.shape[0]:
                raise damaged(path, f"is truncated ({mm.shape[0]} bytes, tensor {name} needs {start + e})")
            arr = mm[start + s : start + e].view(_NP_VIEW[info["dtype"]]).reshape(info["shape"])
        except EmbedwalkError:
            raise
        except (KeyError, TypeError, ValueError) as err:
            raise damaged(path, f"has a damaged header entry for tensor {name!r} ({type(err).__name__}: {err})") from err
        t = torch.from_numpy(arr)
        out[name] = t.view(_TORCH[info["dtype"]]) if info["dtype"] == "BF16" else t
    return out, meta
