"""Run several mergekit configs in ONE mergekit process (its import costs ~10 s on 2 cores).

Run with the mergekit venv's python (benchmarks/peers/setup_mergekit.sh):
    .venv-peers/mergekit/bin/python benchmarks/peers/mergekit_batch.py CONFIG.yaml OUT [CONFIG2.yaml OUT2 ...]
Prints one line per merge: ``<config> <seconds>``. Uses mergekit's public Python API
(``mergekit.merge.run_merge``) on CPU, no model card, quiet.
"""
from __future__ import annotations

import sys
import time

import yaml


def main(argv: list[str]) -> int:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    if len(argv) % 2:
        print("usage: mergekit_batch.py CONFIG OUT [CONFIG OUT ...]", file=sys.stderr)
        return 2
    import os
    import tempfile

    lora_cache = os.environ.get("MERGEKIT_LORA_CACHE") or tempfile.mkdtemp(prefix="mergekit-lora-")
    options = MergeOptions(device="cpu", write_model_card=False, quiet=True, copy_tokenizer=True, lora_merge_cache=lora_cache)
    for config_path, out in zip(argv[::2], argv[1::2]):
        with open(config_path) as f:
            config = MergeConfiguration.model_validate(yaml.safe_load(f))
        start = time.perf_counter()
        run_merge(config, out, options)
        print(f"{config_path} {time.perf_counter() - start:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
