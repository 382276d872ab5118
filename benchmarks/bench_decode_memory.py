"""Where a decoding process's memory goes, with glibc's mmap threshold fixed (heap.py,
the default) and dynamic (``SPARSEMERGE_MMAP_THRESHOLD=dynamic``), in one run.

Each mode runs in a fresh process: resident memory after importing torch, after loading the
packed model, after building the decode engine, and the process's peak; plus the 512-token
prompt time and the decode tokens/s, so the memory saved is weighed against any time lost.

    .venv/bin/python benchmarks/bench_decode_memory.py                 # builds a 2:4 + INT4 SmolLM2 if missing
    .venv/bin/python benchmarks/bench_decode_memory.py --model PACKED --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def _rss() -> tuple[int, int]:
    with open("/proc/self/status") as f:
        d = dict(line.split(":", 1) for line in f)
    return int(d["VmRSS"].split()[0]) // 1024, int(d["VmHWM"].split()[0]) // 1024


def worker(model: str, threads: int, prompt_tokens: int, tokens: int) -> dict:
    import time

    out: dict = {"start": _rss()[0]}
    import torch

    out["torch"] = _rss()[0]
    from sparsemerge.eval.speed import RunSpec

    spec = RunSpec(model=model, act_quant="int8", threads=threads)
    with spec.setup():
        loaded = spec.load()
        out["loaded"] = _rss()[0]
        engine, why = spec.decoder(loaded, max_seq=prompt_tokens + tokens + 8)
        assert engine is not None, why
        out["engine"] = _rss()[0]
        ids = [int(t) for t in torch.randint(1, 1000, (prompt_tokens,), generator=torch.Generator().manual_seed(0))]
        prompt_s = []
        for _ in range(3):
            engine.reset()
            t0 = time.perf_counter()
            logits = engine.prefill(ids)
            prompt_s.append(time.perf_counter() - t0)
        out["prompt_tok_s"] = prompt_tokens / min(prompt_s)
        decode_s = []
        for _ in range(3):
            engine.reset()
            logits = engine.prefill(ids[:16])
            t0 = time.perf_counter()
            for _ in range(tokens):
                logits = engine.step(int(logits.argmax()))
            decode_s.append(time.perf_counter() - t0)
        out["decode_tok_s"] = tokens / min(decode_s)
    out["after"], out["peak"] = _rss()
    return out


def _default_model(work: Path) -> Path:
    packed = work / "smol-24-int4-g128"
    if not (packed / "sparsemerge_packed.json").is_file():
        cli = [PY, "-m", "sparsemerge.cli.main"]
        subprocess.run(cli + ["prune", "smollm2", str(work / "smol-24"), "--pattern", "2:4", "--no-progress", "--overwrite"], check=True)
        subprocess.run(cli + ["pack", str(work / "smol-24"), str(packed), "--quant", "int4", "--group", "128",
                              "--dense-quant", "int8", "--no-progress", "--overwrite"], check=True)
    return packed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="a packed checkpoint (default: SmolLM2 2:4 magnitude + INT4 g128)")
    ap.add_argument("--work", type=Path, default=ROOT / "outputs" / "bench-decode-memory")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(str(args.model), args.threads, args.prompt_tokens, args.tokens)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    model = args.model or _default_model(args.work)
    rows = {}
    for mode in ("loading", "dynamic"):
        env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "SPARSEMERGE_MMAP_THRESHOLD")}
        if mode == "dynamic":
            env["SPARSEMERGE_MMAP_THRESHOLD"] = "dynamic"
        cmd = [PY, __file__, "--worker", "--model", str(model), "--threads", str(args.threads),
               "--prompt-tokens", str(args.prompt_tokens), "--tokens", str(args.tokens)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        rows[mode] = json.loads(res.stdout.strip().splitlines()[-1])
    head = ["mmap threshold", "torch MiB", "+load MiB", "+engine MiB", "peak MiB", f"prompt {args.prompt_tokens} tok/s", "decode tok/s"]
    print(" | ".join(head))
    for mode, r in rows.items():
        print(" | ".join(str(x) for x in (mode, r["torch"], r["loaded"] - r["torch"], r["engine"] - r["loaded"], r["peak"],
                                           f"{r['prompt_tok_s']:.0f}", f"{r['decode_tok_s']:.1f}")))
    f, d = rows["loading"], rows["dynamic"]
    print(f"loading / dynamic: peak {f['peak'] / d['peak']:.2f}x, prompt {f['prompt_tok_s'] / d['prompt_tok_s']:.2f}x, "
          f"decode {f['decode_tok_s'] / d['decode_tok_s']:.2f}x ({model}, {args.threads} threads)")


if __name__ == "__main__":
    main()
