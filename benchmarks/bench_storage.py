"""Compressed storage benchmark (issue 3): pack the 2:4-pruned SmolLM2 in every format and
codec, and print file sizes against dense fp32 / fp16 and against the compressed-tensors
sparse-24-bitmask layout, metadata bits per group against the entropy bound log2 C(4,2),
and encode (pack) / decode (read + to dense) throughput.

    .venv/bin/python benchmarks/bench_storage.py [--pruned DIR] [--quick]

DIR defaults to outputs/bench_storage/smollm2-2of4 and is created with
``sparsemerge prune smollm2 DIR --pattern 2:4`` when missing. The compressed-tensors
layout is written by our exporter; when the peer venv exists
(benchmarks/bench_storage_setup_peers.sh) the installed compressed-tensors library checks
it (config schema + bitmask decoding, see bench_storage_ct_check.py).

Targets: 2:4 + INT4 (group 128, the embedding in INT8) under 0.16x of dense fp32;
entropy-coded metadata within 1 % of log2 C(4,2) = 2.585 bits per group.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sparsemerge.eval.report import format_table  # noqa: E402
from sparsemerge.formats.model import MANIFEST_NAME, pack, read_packed  # noqa: E402

DEFAULT_PRUNED = ROOT / "outputs" / "bench_storage" / "smollm2-2of4"
PEER = ROOT / ".venv-peers" / "compressed-tensors" / "bin" / "python"

# (label, pack options); "ct" rows are the compressed-tensors layout.
VARIANTS = [
    ("dense fp16", dict(format="dense", dtype="float16")),
    ("ct sparse-24-bitmask fp32", dict(format="sparse-24-bitmask")),
    ("ct sparse-24-bitmask fp16", dict(format="sparse-24-bitmask", dtype="float16")),
    ("nm 2:4 bits2 fp32", dict(metadata="bits2")),
    ("nm 2:4 index fp32", dict(metadata="index")),
    ("nm 2:4 entropy fp32", dict(metadata="entropy")),
    ("nm 2:4 bits2 fp16", dict(metadata="bits2", dtype="float16")),
    ("nm 2:4 index fp16", dict(metadata="index", dtype="float16")),
    ("nm 2:4 entropy fp16", dict(metadata="entropy", dtype="float16")),
    ("nm 2:4 entropy int8 g128 (emb int8)", dict(quant="int8", dense_quant="int8")),
    ("nm 2:4 entropy int4 g128 (emb int8)", dict(quant="int4", dense_quant="int8")),
    ("nm 2:4 entropy int4 channel (emb int8)", dict(quant="int4", group_size=0, dense_quant="int8")),
    ("nm 2:4 entropy int4 g128 asym (emb int8)", dict(quant="int4", symmetric=False, dense_quant="int8")),
    ("nm 2:4 entropy codebook16 (emb int8)", dict(codebook=16, dense_quant="int8")),
    ("bitmask fp16", dict(format="bitmask", dtype="float16")),
    ("coo fp16", dict(format="coo", dtype="float16")),
    ("csr fp16", dict(format="csr", dtype="float16")),
    ("bsr 16 fp16", dict(format="bsr", block=16, dtype="float16")),
]
QUICK = {"ct sparse-24-bitmask fp32", "ct sparse-24-bitmask fp16", "nm 2:4 entropy fp32", "nm 2:4 bits2 fp16",
         "nm 2:4 entropy fp16", "nm 2:4 entropy int4 g128 (emb int8)", "csr fp16"}


def folder_bytes(folder: Path) -> tuple[int, int]:
    """(bytes of weight shards + manifest, bytes of everything)."""
    weights = total = 0
    for path in folder.iterdir():
        size = path.stat().st_size
        total += size
        if path.suffix == ".safetensors" or path.name in (MANIFEST_NAME, "model.safetensors.index.json"):
            weights += size
    return weights, total


def metadata_bits_per_group(folder: Path) -> "float | None":
    import json

    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    bits = groups = 0
    for record in manifest["tensors"].values():
        if record["format"] == "nm":
            bits += 8 * math.prod(record["fields"]["metadata"]["shape"])
            groups += record["shape"][0] * record["shape"][1] // record["params"]["m"]
    return bits / groups if groups else None


def decode_all(folder: Path) -> tuple[float, int]:
    started = time.perf_counter()
    numel = 0
    with read_packed(folder) as packed:
        for name in packed.names():
            numel += packed.get_dense(name).numel()
    return time.perf_counter() - started, numel


def ensure_pruned(path: Path) -> Path:
    if (path / "config.json").is_file():
        return path
    print(f"pruning SmolLM2 to 2:4 into {path} (once) ...", flush=True)
    subprocess.run([sys.executable, "-m", "sparsemerge.cli.main", "prune", "smollm2", str(path), "--pattern", "2:4", "--no-progress"], check=True)
    return path


def peer_check(ct_folder: Path, pruned: Path) -> str:
    if not PEER.exists():
        return "compressed-tensors peer venv absent (run benchmarks/bench_storage_setup_peers.sh); layout checked against its documented format only"
    result = subprocess.run([str(PEER), str(ROOT / "benchmarks" / "bench_storage_ct_check.py"), str(ct_folder), str(pruned)], capture_output=True, text=True)
    version = subprocess.run([str(PEER), "-c", "import compressed_tensors as c; print(c.__version__)"], capture_output=True, text=True).stdout.strip()
    text = (result.stdout.strip() or result.stderr.strip().splitlines()[-1]) if result.stdout or result.stderr else "no output"
    return f"compressed-tensors {version}: {text}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pruned", type=Path, default=DEFAULT_PRUNED)
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "bench_storage" / "work")
    parser.add_argument("--quick", action="store_true", help="a subset of the variants")
    args = parser.parse_args()
    pruned = ensure_pruned(args.pruned)
    source_bytes = sum(p.stat().st_size for p in pruned.glob("*.safetensors"))
    args.work.mkdir(parents=True, exist_ok=True)

    results = []
    ct_bytes: dict[str, int] = {}
    peer_line = ""
    entropy_bound = math.log2(math.comb(4, 2))
    for label, options in VARIANTS:
        if args.quick and label not in QUICK:
            continue
        out = args.work / label.replace(" ", "_").replace(":", "").replace("(", "").replace(")", "")
        started = time.perf_counter()
        report = pack(pruned, out, overwrite=True, **options)
        encode_s = time.perf_counter() - started
        weights, _ = folder_bytes(out)
        decode_s, numel = decode_all(out)
        if label.startswith("ct "):
            ct_bytes[label.split()[-1]] = weights
            if label.endswith("fp32"):
                peer_line = peer_check(out, pruned)
        meta = metadata_bits_per_group(out) if (out / MANIFEST_NAME).is_file() else None
        results.append((label, options, weights, report.numel, encode_s, decode_s, meta))
        print(f"  {label}: {weights:,} B, pack {encode_s:.1f} s, decode {decode_s:.1f} s", flush=True)
        if not label.startswith("ct sparse-24-bitmask fp32"):
            shutil.rmtree(out, ignore_errors=True)

    numel = results[0][3]
    fp32, fp16 = 4 * numel, 2 * numel
    rows = []
    for label, options, weights, _, enc, dec, meta in results:
        ct_ref = ct_bytes.get("fp16" if options.get("dtype") == "float16" else "fp32")
        rows.append((
            label,
            f"{weights:,}",
            f"{weights / fp32:.4f}",
            f"{weights / fp16:.4f}",
            f"{weights / ct_ref:.4f}" if ct_ref else "-",
            f"{8 * weights / numel:.3f}",
            f"{meta:.4f}" if meta is not None else "-",
            f"{(meta / entropy_bound - 1) * 100:+.2f} %" if meta is not None else "-",
            f"{numel / enc / 1e6:.1f}",
            f"{numel / dec / 1e6:.1f}",
        ))
    print()
    print(f"SmolLM2-135M 2:4 magnitude-pruned: {numel:,} weights; dense fp32 {fp32:,} B (source file {source_bytes:,} B), dense fp16 {fp16:,} B")
    print(f"entropy bound log2 C(4,2) = {entropy_bound:.4f} bits/group; machine: {os.cpu_count()} CPU cores, torch threads {__import__('torch').get_num_threads()}")
    print(format_table(
        ["variant", "file bytes", "x fp32", "x fp16", "x ct (same dtype)", "bits/weight", "meta bits/group", "vs bound", "encode Mw/s", "decode Mw/s"],
        rows,
    ))
    target = next((r for r in results if r[0] == "nm 2:4 entropy int4 g128 (emb int8)"), None)
    if target:
        ratio = target[2] / fp32
        print(f"target 2:4 + INT4 g128 (+ INT8 embedding) < 0.16x dense fp32: {ratio:.4f}x -> {'met' if ratio < 0.16 else 'MISSED'}")
    entropy = next((r for r in results if r[0] == "nm 2:4 entropy fp32"), None)
    if entropy and entropy[6] is not None:
        over = entropy[6] / entropy_bound - 1
        print(f"target entropy metadata within 1 % of log2 C(4,2): {entropy[6]:.4f} bits/group ({over * 100:+.2f} %) -> {'met' if over < 0.01 else 'MISSED'}")
    print(f"peer check: {peer_line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
