"""Reading a dist folder's weights (TVM tensor cache), checking every shard before trusting it.

Each shard's size and md5 are checked against `tensor-cache.json`; each record must lie inside its
shard with `nbytes` matching its shape and dtype. The result is keyed by parameter name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tvm

from mobilevlm_mlc.errors import MobileVLMError
from mobilevlm_mlc.fileio import read_json

TENSOR_CACHE = "tensor-cache.json"
_DTYPES = {"float32": np.float32, "float16": np.float16, "uint32": np.uint32, "int32": np.int32}


def _records(path: Path, cache: dict[str, Any]) -> list[dict[str, Any]]:
    shards = cache.get("records")
    if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
        raise MobileVLMError(f"{path}: field 'records' must be a list of shard objects")
    return shards


def load_tensor_cache(
    dist: Path, device: tvm.runtime.Device, place: Callable[[np.ndarray], tvm.runtime.Tensor] | None = None
) -> dict[str, tvm.runtime.Tensor]:
    """The weights on `device`; `place` puts an array there instead of `tvm.runtime.tensor` (the engine's
    huge-page arena on a local CPU)."""
    place = place or (lambda array: tvm.runtime.tensor(array, device))
    path = Path(dist) / TENSOR_CACHE
    cache = read_json(path, TENSOR_CACHE)
    params: dict[str, tvm.runtime.Tensor] = {}
    for shard in _records(path, cache):
        try:
            data_path, nbytes, md5 = str(shard["dataPath"]), int(shard["nbytes"]), shard.get("md5sum")
            records = list(shard["records"])
        except (KeyError, TypeError, ValueError, OverflowError) as err:
            raise MobileVLMError(f"{path}: malformed shard entry ({type(err).__name__}: {err})") from None
        file = Path(dist) / data_path
        if Path(data_path).is_absolute() or ".." in Path(data_path).parts:
            raise MobileVLMError(f"{path}: shard path '{data_path}' leaves the dist folder")
        if not file.is_file():
            raise MobileVLMError(f"{file}: weight shard not found")
        data = file.read_bytes()
        if len(data) != nbytes:
            raise MobileVLMError(
                f"{file}: shard is {len(data)} bytes, {TENSOR_CACHE} says {nbytes} (truncated or replaced)"
            )
        if md5 is not None and hashlib.md5(data).hexdigest() != md5:
            raise MobileVLMError(f"{file}: md5 mismatch (shard corrupted or replaced)")
        for record in records:
            params.update([_tensor(path, file, data, record, place)])
    return params


def _tensor(
    path: Path, file: Path, data: bytes, record: Any, place: Callable[[np.ndarray], tvm.runtime.Tensor]
) -> tuple[str, tvm.runtime.Tensor]:
    try:
        name, dtype, shape = str(record["name"]), str(record["dtype"]), [int(d) for d in record["shape"]]
        offset, nbytes = int(record["byteOffset"]), int(record["nbytes"])
    except (KeyError, TypeError, ValueError, OverflowError) as err:
        raise MobileVLMError(f"{path}: malformed record ({type(err).__name__}: {err})") from None
    if dtype not in _DTYPES:
        raise MobileVLMError(f"{path}: {name} has dtype '{dtype}', expected one of {', '.join(_DTYPES)}")
    if record.get("format", "raw") != "raw":
        raise MobileVLMError(f"{path}: {name} has format '{record.get('format')}', expected 'raw'")
    expected = int(np.prod(shape)) * np.dtype(_DTYPES[dtype]).itemsize
    if nbytes != expected or offset < 0 or offset + nbytes > len(data) or min(shape, default=1) < 0:
        raise MobileVLMError(f"{path}: {name} ({shape} {dtype}, {nbytes} bytes at {offset}) does not fit {file.name}")
    array = np.frombuffer(data, _DTYPES[dtype], int(np.prod(shape)), offset).reshape(shape)
    return name, place(array)
