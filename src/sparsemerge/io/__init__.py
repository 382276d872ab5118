"""Checkpoint I/O: sources in (HF folder, safetensors, GGUF, bundled model), lazy tensor
access, atomic outputs and checksums. Every safetensors read goes through
:mod:`.reader`, every write through :mod:`.writer`; dtype names live in :mod:`.dtypes`."""
from sparsemerge.io.atomic import atomic_output, ensure_writable, write_json_atomic
from sparsemerge.io.checksum import fields_digest, sha256_file, sha256_files
from sparsemerge.io.dtypes import dtype_from_name, dtype_name
from sparsemerge.io.reader import SafetensorsFile, ShardReader, load_safetensors
from sparsemerge.io.sources import (
    BUNDLED_MODELS,
    LoadedModel,
    ResolvedSource,
    load_model,
    resolve_source,
    save_model,
)
from sparsemerge.io.tensors import TensorSource, open_tensor_source
from sparsemerge.io.writer import PlannedTensor, ShardedWriter, save_safetensors

__all__ = [
    "atomic_output",
    "ensure_writable",
    "write_json_atomic",
    "sha256_file",
    "sha256_files",
    "fields_digest",
    "dtype_from_name",
    "dtype_name",
    "SafetensorsFile",
    "ShardReader",
    "load_safetensors",
    "PlannedTensor",
    "ShardedWriter",
    "save_safetensors",
    "BUNDLED_MODELS",
    "LoadedModel",
    "ResolvedSource",
    "load_model",
    "resolve_source",
    "save_model",
    "TensorSource",
    "open_tensor_source",
]
