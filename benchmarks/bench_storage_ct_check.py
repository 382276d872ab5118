"""Run inside the compressed-tensors peer venv: check that a folder written by
``sparsemerge pack --format sparse-24-bitmask`` follows the library's layout.

Usage: .venv-peers/compressed-tensors/bin/python benchmarks/bench_storage_ct_check.py CT_FOLDER DENSE_FOLDER

compressed-tensors >= 0.15 no longer ships the Sparse24BitMask compressor, so this checks
what the installed release still defines: the config schema (``Sparse24BitMaskConfig``
validates our ``sparsity_config``) and the bit layout (the library's ``unpack_bitmasks``
decodes our bitmasks; values scattered into them rebuild the dense weights exactly).
"""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def main(ct: str, dense: str) -> int:
    from compressed_tensors.config import Sparse24BitMaskConfig, SparsityCompressionConfig
    from compressed_tensors.utils.helpers import pack_bitmasks, unpack_bitmasks

    config = json.loads((Path(ct) / "config.json").read_text())
    sparsity = config["quantization_config"]["sparsity_config"]
    parsed = SparsityCompressionConfig.load_from_registry(sparsity["format"], **{k: v for k, v in sparsity.items() if k != "format"})
    assert isinstance(parsed, Sparse24BitMaskConfig), type(parsed)
    state = load_file(str(Path(ct) / "model.safetensors"))
    reference = load_file(str(Path(dense) / "model.safetensors"))
    checked = 0
    for module in sparsity["targets"]:
        shape = state[f"{module}.shape"].reshape(-1).tolist()
        mask = unpack_bitmasks(state[f"{module}.bitmask"], shape)
        assert torch.equal(pack_bitmasks(mask), state[f"{module}.bitmask"]), module
        rebuilt = torch.zeros(shape, dtype=state[f"{module}.compressed"].dtype)
        rebuilt[mask] = state[f"{module}.compressed"].flatten()
        assert torch.equal(rebuilt, reference[f"{module}.weight"]), module
        assert int(mask.reshape(-1, 4).sum(1).min()) == 2 == int(mask.reshape(-1, 4).sum(1).max()), module
        checked += 1
    print(f"ok: {checked} tensors match compressed-tensors' bitmask layout and config schema")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
