"""Calibrated 2:4 pruning of SmolLM2-135M: sparsemerge (Wanda, SparseGPT) vs llm-compressor.

One run: loads the bundled SmolLM2 weights, draws the calibration windows once (BBC calib
split), saves them for the peer, prunes with sparsemerge in this process and with
llm-compressor's ``oneshot`` (``SparseGPTModifier`` / ``WandaPruningModifier``,
``mask_structure="2:4"``, ``targets=["Linear"]``, ``ignore=["lm_head"]``, sparsity 0.5) in a
subprocess of its own venv on the same weights and the same token ids, then measures the
held-out perplexity of every result here with the same windows, and prints one table.

    bash benchmarks/peers/setup_llmcompressor.sh          # once
    .venv/bin/python benchmarks/bench_calibrated.py --nsamples 64 --seqlen 512

Ours runs with the defaults (``sequential="auto"``: SparseGPT ``"layer"`` - one pass per block,
each layer pruned as its input arrives - and Wanda one-shot, ``"off"``); ``--all-modes`` adds
the other walks of each method.

Times: sparsemerge = the ``prune_`` call (model already in memory); llm-compressor = its
``oneshot`` call (model already in memory), and in brackets the whole subprocess
(imports, model load and weight export included).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PEER_PY = ROOT / ".venv-peers" / "llmcompressor" / "bin" / "python"


def run_ours(base_state, model, method, sequential, calib, args):
    from sparsemerge.prune.api import prune_

    model.load_state_dict(base_state)
    config = {"method": method, "pattern": "2:4", "sequential": sequential, "progress": False}
    start = time.perf_counter()
    prune_(model, config, calibration=calib)
    return time.perf_counter() - start


def run_peer(method, folder, calib_path, work, args, ignore=None):
    out = work / f"llmc-{method}{'-' + ignore.replace(':', '').replace('*', '').replace('.', '') if ignore else ''}"
    cmd = [str(PEER_PY), str(ROOT / "benchmarks" / "peers" / "run_llmcompressor.py"), "--model", str(folder),
           "--calib", str(calib_path), "--method", method, "--out", str(out), "--batch-size", str(args.peer_batch_size)]
    if ignore:
        cmd += ["--ignore", ignore]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"llm-compressor {method} failed (exit {proc.returncode})")
    timing = json.loads((out / "timing.json").read_text())
    return out / "pruned.safetensors", timing["oneshot_s"], wall


def load_peer_weights(model, base_state, path):
    from safetensors.torch import load_file

    model.load_state_dict(base_state)
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise SystemExit(f"peer weights do not fit the model: unexpected {unexpected[:5]}")


def sparsity_note(model):
    from sparsemerge.masks import check_pattern

    bad, head = 0, None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            bad += check_pattern(module.weight.detach(), "2:4").violations
        if name.endswith("lm_head"):
            head = 1.0 - float((module.weight != 0).float().mean())
    return bad, head


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-windows", type=int, default=32, help="held-out windows of --seqlen tokens")
    p.add_argument("--peer-batch-size", type=int, default=8, help="llm-compressor batch size (ours uses 8)")
    p.add_argument("--skip-peer", action="store_true")
    p.add_argument("--all-modes", action="store_true", help="also run ours with sequential='block' and one-shot SparseGPT")
    p.add_argument("--peer-fix", action="store_true", help="also run llm-compressor Wanda with ignore=['re:.*lm_head']")
    args = p.parse_args()

    from sparsemerge.eval.data import calibration_windows, eval_windows
    from sparsemerge.eval.perplexity import perplexity
    from sparsemerge.io import load_model, resolve_source
    from sparsemerge.io.sources import gguf_as_hf_folder

    loaded = load_model("smollm2")
    model, tok = loaded.model, loaded.tokenizer
    folder = gguf_as_hf_folder(resolve_source("smollm2"), show_progress=False)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    calib = calibration_windows(tok, "bbc", args.nsamples, args.seqlen, args.seed)
    windows = eval_windows(tok, "bbc", args.seqlen, args.eval_windows)
    ppl = lambda: perplexity(model, windows, progress=False)  # noqa: E731

    rows = []  # (tool, method, ppl, seconds, note)
    rows.append(("-", "dense", ppl(), None, ""))
    print(f"dense ppl {rows[-1][2]:.2f}", flush=True)
    ours = {}
    # "sparsegpt" / "wanda": the defaults (sequential="auto": layer for SparseGPT, one-shot for Wanda)
    runs = [("sparsegpt", "sparsegpt", "auto"), ("wanda", "wanda", "auto")]
    if args.all_modes:
        runs += [("sparsegpt sequential=block", "sparsegpt", "block"), ("sparsegpt one-shot", "sparsegpt", "off"),
                 ("wanda sequential=layer", "wanda", "layer"), ("wanda sequential=block", "wanda", "block")]
    for label, method, seq in runs:
        seconds = run_ours(base_state, model, method, seq, calib, args)
        ours[label] = (ppl(), seconds)
        rows.append(("sparsemerge", label, ours[label][0], seconds, ""))
        print(f"sparsemerge {label}: ppl {ours[label][0]:.2f}, {seconds:.1f} s", flush=True)

    peer = {}
    if not args.skip_peer:
        if not PEER_PY.exists():
            raise SystemExit(f"{PEER_PY} missing: run bash benchmarks/peers/setup_llmcompressor.sh")
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            calib_path = work / "calib.pt"
            torch.save(calib, calib_path)
            runs = [("sparsegpt", None), ("wanda", None)] + ([("wanda", "re:.*lm_head")] if args.peer_fix else [])
            for method, ignore in runs:
                path, oneshot_s, wall = run_peer(method, folder, calib_path, work, args, ignore)
                load_peer_weights(model, base_state, path)
                violations, head = sparsity_note(model)
                label = method + (f" ignore={ignore}" if ignore else "")
                value = ppl()
                peer[label] = (value, oneshot_s, wall)
                note = f"lm_head sparsity {head:.2f}" + (f", {violations} 2:4 violations" if violations else "")
                rows.append(("llm-compressor", label, value, oneshot_s, f"{note}; subprocess {wall:.0f} s"))
                print(f"llm-compressor {label}: ppl {value:.2f}, oneshot {oneshot_s:.1f} s, subprocess {wall:.1f} s ({note})", flush=True)

    print()
    print(f"SmolLM2-135M, 2:4 on all block Linears, calibration {args.nsamples} x {args.seqlen} BBC calib tokens "
          f"(seed {args.seed}), perplexity on {windows.shape[0]} x {args.seqlen} held-out BBC tokens, "
          f"torch threads {torch.get_num_threads()}")
    print("| tool | method | perplexity | time (s) | note |")
    print("|---|---|---:|---:|---|")
    for tool, method, value, seconds, note in rows:
        print(f"| {tool} | {method} | {value:.2f} | {'-' if seconds is None else f'{seconds:.1f}'} | {note} |")
    if peer:
        print()
        for label, (ours_label, peer_label) in {"sparsegpt": ("sparsegpt", "sparsegpt"), "wanda": ("wanda", "wanda")}.items():
            if peer_label in peer:
                o, pr = ours[ours_label], peer[peer_label]
                print(f"{label}: perplexity ratio peer/ours {pr[0] / o[0]:.2f}, speed-up vs oneshot {pr[1] / o[1]:.2f}x, "
                      f"vs peer subprocess {pr[2] / o[1]:.2f}x")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
