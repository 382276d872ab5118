"""Run several mergekit-moe configs in ONE mergekit process (its import costs ~10 s on 2 cores).

Run with the mergekit venv's python (benchmarks/peers/setup_mergekit.sh):
    .venv-peers/mergekit/bin/python benchmarks/peers/mergekit_moe_batch.py CONFIG.yaml OUT [CONFIG2.yaml OUT2 ...]
Prints one line per build: ``<config> <seconds>``. Uses mergekit-moe's public Python entry
(``mergekit.scripts.moe.build``) on CPU, as ``mergekit-moe --device cpu`` does, no model card.
``--allow-all-same`` passes mergekit's ``--i-understand-this-is-not-useful-without-training``.
"""
from __future__ import annotations

import sys
import time

import yaml


def main(argv: list[str]) -> int:
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.options import MergeOptions
    from mergekit.scripts.moe import build

    allow = "--allow-all-same" in argv
    argv = [a for a in argv if a != "--allow-all-same"]
    if len(argv) % 2 or not argv:
        print("usage: mergekit_moe_batch.py [--allow-all-same] CONFIG OUT [CONFIG OUT ...]", file=sys.stderr)
        return 2
    options = MergeOptions(device="cpu", write_model_card=False, quiet=True, copy_tokenizer=True)
    for config_path, out in zip(argv[::2], argv[1::2]):
        with open(config_path) as f:
            config = MoEMergeConfig.model_validate(yaml.safe_load(f))
        start = time.perf_counter()
        build(config, out_path=out, merge_options=options, device="cpu", allow_all_same=allow)
        print(f"{config_path} {time.perf_counter() - start:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
