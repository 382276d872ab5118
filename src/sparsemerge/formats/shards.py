"""Former home of the packed checkpoints' shard reader and writer; they live in
:mod:`sparsemerge.io` now (one reader, one writer for every safetensors file). These names
stay importable from here."""
from sparsemerge.io.checksum import fields_digest
from sparsemerge.io.reader import ShardReader
from sparsemerge.io.writer import tensor_bytes

__all__ = ["ShardReader", "fields_digest", "tensor_bytes"]
