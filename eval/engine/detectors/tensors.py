"""The shared, validated I/O of fitted detectors and the float64 view every detector computes in.

Fitted detectors are saved as ``<dir>/<name>.safetensors`` (tensors) + ``<dir>/<name>.json``
(metadata with a sha256 of the tensors)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from mood_data import atomic
from mood_data.errors import BundleError
from mood_data.readers import read_json

FORMAT_VERSION = 1


def tensors_sha256(tensors: dict[str, np.ndarray]) -> str:
    """A digest over names, dtypes, shapes and bytes of ``tensors`` (order independent)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        h.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def save_tensors(directory: str | Path, name: str, tensors: dict[str, np.ndarray], meta: dict) -> Path:
    """Write ``<name>.safetensors`` + ``<name>.json`` atomically; returns the JSON path."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    with atomic.atomic_path(directory / f"{name}.safetensors") as tmp:
        save_file(tensors, str(tmp))
    doc = dict(meta)
    doc["format_version"] = FORMAT_VERSION
    doc["tensors"] = {k: {"dtype": v.dtype.name, "shape": list(v.shape)} for k, v in tensors.items()}
    doc["sha256"] = tensors_sha256(tensors)
    return atomic.write_json(directory / f"{name}.json", doc)


def load_tensors(directory: str | Path, name: str, kind: str) -> tuple[dict[str, np.ndarray], dict]:
    """Read and validate a detector written by :func:`save_tensors`.

    Checks the detector ``kind``, that every tensor listed in the JSON is present with that
    dtype and shape (and no others), and the sha256. Any problem -> one-line BundleError.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    directory = Path(directory)
    jpath, tpath = directory / f"{name}.json", directory / f"{name}.safetensors"
    for p in (jpath, tpath):
        if not p.is_file():
            raise BundleError(f"{p}: file not found")
    meta = read_json(jpath, BundleError)
    if meta.get("detector") != kind:
        got = meta.get("detector")
        raise BundleError(f"{jpath}: field 'detector': expected '{kind}', got {got!r}")
    spec = meta.get("tensors")
    if not isinstance(spec, dict):
        raise BundleError(f"{jpath}: field 'tensors': missing or not a mapping")
    try:
        tensors = load_file(str(tpath))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(f"{tpath}: not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    for key in sorted(set(spec) | set(tensors)):
        if key not in tensors:
            raise BundleError(f"{tpath}: tensor '{key}': missing")
        if key not in spec:
            raise BundleError(f"{tpath}: tensor '{key}': not listed in {jpath.name}")
        arr, want = tensors[key], spec[key]
        if arr.dtype.name != want.get("dtype") or list(arr.shape) != list(want.get("shape", [])):
            raise BundleError(
                f"{tpath}: tensor '{key}': expected {want.get('dtype')} {want.get('shape')}, "
                f"got {arr.dtype.name} {list(arr.shape)}"
            )
    if tensors_sha256(tensors) != meta.get("sha256"):
        raise BundleError(f"{tpath}: sha256 does not match the one recorded in {jpath.name} (tampered or corrupted)")
    return tensors, meta


def check_shape(path: str | Path, key: str, arr: np.ndarray, shape: tuple) -> None:
    """Raise a one-line BundleError unless ``arr.shape == shape`` and it is float64/float32."""
    if tuple(arr.shape) != tuple(shape):
        raise BundleError(f"{path}: tensor '{key}': expected shape {list(shape)}, got {list(arr.shape)}")
    if arr.dtype not in (np.float64, np.float32):
        raise BundleError(f"{path}: tensor '{key}': expected a float tensor, got {arr.dtype.name}")


def as_f64(x) -> np.ndarray:
    """numpy float64 view of an array / torch tensor (2-D features stay 2-D)."""
    if hasattr(x, "detach"):  # torch tensor (bf16 has no numpy dtype: convert in torch first)
        import torch

        x = x.detach().cpu().to(dtype=torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


__all__ = ["FORMAT_VERSION", "as_f64", "check_shape", "load_tensors", "save_tensors", "tensors_sha256"]
