"""Streaming on a small scale: ``prune`` (magnitude) and ``pack`` hold a few tensors, not the model.

Each command runs twice in a fresh process: on a 1-layer model (the baseline: interpreter,
imports, lazily loaded code, a 30 MB model) and on a 12-layer model of the same shape
(171 MB, 135 MiB more). Streaming, the two peaks differ by a few of the largest tensors (8 MB
each; measured: prune +1 MiB, pack +3 MiB); the loading path of ``prune`` measured +256 MiB.
The bound, 40 MiB, is under a third of the extra weights: loading fails it, noise does not.
The full-size run (4.4 GB under a 1.1 GB limit) is benchmarks/bench_larger_than_memory.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SM = [sys.executable, "-c", "import sys; from sparsemerge.cli.main import main; sys.exit(main(sys.argv[1:]))"]
HIDDEN, INTER, VOCAB = 512, 1408, 4096
BOUND = 40 * 2**20


def write_llama(folder: Path, layers: int) -> int:
    """A random float32 Llama folder, one shard per layer (written shard by shard); returns its bytes."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(layers)
    rand = lambda *shape: torch.randn(shape, generator=g) * 0.02  # noqa: E731
    shards = [{"model.embed_tokens.weight": rand(VOCAB, HIDDEN), "model.norm.weight": torch.ones(HIDDEN),
               "lm_head.weight": rand(VOCAB, HIDDEN)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        shards.append({p + "input_layernorm.weight": torch.ones(HIDDEN), p + "post_attention_layernorm.weight": torch.ones(HIDDEN),
                       **{p + f"self_attn.{k}_proj.weight": rand(HIDDEN, HIDDEN) for k in "qkvo"},
                       p + "mlp.gate_proj.weight": rand(INTER, HIDDEN), p + "mlp.up_proj.weight": rand(INTER, HIDDEN),
                       p + "mlp.down_proj.weight": rand(HIDDEN, INTER)})
    weight_map, total = {}, 0
    for k, state in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(state, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(state, name))
        total += sum(t.numel() * 4 for t in state.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers,
                num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False).save_pretrained(folder)
    return total


# Linux carries the high-water RSS of the image an exec replaces into the new program's
# ru_maxrss, so a child forked from this (large) test process would report at least this
# process's RSS. A small launcher (python -S) forks the command and reports its rusage.
LAUNCHER = (
    "import json, os, sys\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    os.execv(sys.argv[2], sys.argv[2:])\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "open(sys.argv[1], 'w').write(json.dumps(usage.ru_maxrss))\n"
    "sys.exit(os.waitstatus_to_exitcode(status) % 256)\n"
)


def peak_rss(report: Path, *args: object) -> int:
    """Maximum resident set (bytes) of ``sparsemerge ARGS`` run in a fresh process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, str(report), *SM, *map(str, args)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return json.loads(report.read_text()) * 1024


def test_prune_and_pack_stream_tensor_by_tensor(tmp_path):
    small, big = tmp_path / "small", tmp_path / "big"
    extra = write_llama(big, 12) - write_llama(small, 1)
    assert extra > 3 * BOUND  # the bound could not hide a loaded model

    def both(*args_of):  # the baseline and the big run side by side (2 cores)
        with ThreadPoolExecutor(2) as pool:
            return list(pool.map(lambda ia: peak_rss(tmp_path / f"rusage-{ia[0]}-{ia[1][0]}.json", *ia[1]), enumerate(args_of)))

    flags = ["--pattern", "2:4", "--method", "magnitude", "--no-progress"]
    base, peak = both(["prune", small, tmp_path / "small-2of4", *flags], ["prune", big, tmp_path / "big-2of4", *flags])
    assert peak - base < BOUND, f"prune: {peak / 2**20:.0f} MiB vs {base / 2**20:.0f} MiB on 1 layer; {extra / 2**20:.0f} MiB more weights"
    pbase, ppeak = both(["pack", tmp_path / "small-2of4", tmp_path / "small-packed", "--no-progress"],
                        ["pack", tmp_path / "big-2of4", tmp_path / "big-packed", "--no-progress"])
    assert ppeak - pbase < BOUND, f"pack: {ppeak / 2**20:.0f} MiB vs {pbase / 2**20:.0f} MiB on 1 layer; {extra / 2**20:.0f} MiB more weights"
    assert json.loads((tmp_path / "big-2of4" / "sparsemerge_prune.json").read_text())["overall_sparsity"] == 0.5
