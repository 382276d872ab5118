"""Checkpoint I/O: sources in (HF folder, safetensors, GGUF, bundled model), lazy tensor
access, atomic outputs and checksums."""
from sparsemerge.io.atomic import atomic_output, ensure_writable, write_json_atomic
from sparsemerge.io.checksum import sha256_file, sha256_files
from sparsemerge.io.sources import (
    BUNDLED_MODELS,
    LoadedModel,
    ResolvedSource,
    load_model,
    resolve_source,
    save_model,
)
from sparsemerge.io.tensors import TensorSource, open_tensor_source

__all__ = [
    "atomic_output",
    "ensure_writable",
    "write_json_atomic",
    "sha256_file",
    "sha256_files",
    "BUNDLED_MODELS",
    "LoadedModel",
    "ResolvedSource",
    "load_model",
    "resolve_source",
    "save_model",
    "TensorSource",
    "open_tensor_source",
]
