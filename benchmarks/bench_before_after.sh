#!/usr/bin/env bash
# Before/after check of a refactor: the GEMV, pack (storage) and merge-speed benchmarks run on
# an older commit and on the working tree, back to back, on the same inputs and machine.
#   bash benchmarks/bench_before_after.sh BEFORE_COMMIT [OUT_DIR]
# The older commit is checked out as a git worktree under outputs/before-<commit> and imported
# through PYTHONPATH with this checkout's .venv (the same packages), so only the code differs.
# Results: OUT_DIR/{before,after}-{gemv,storage,merge}.txt (default outputs/before-after).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BEFORE="${1:?usage: bench_before_after.sh BEFORE_COMMIT [OUT_DIR]}"
OUT="${2:-$ROOT/outputs/before-after}"
WT="$ROOT/outputs/before-$BEFORE"
mkdir -p "$OUT"
[ -d "$WT" ] || git -C "$ROOT" worktree add --detach "$WT" "$BEFORE"
ln -sfn "$ROOT/.venv" "$WT/.venv"
ln -sfn "$ROOT/.venv-peers" "$WT/.venv-peers"
mkdir -p "$WT/outputs"
PY="$ROOT/.venv/bin/python"
GEMV_ARGS=(--threads 1 --batches 1 --shapes 4096x4096,4096x11008 --variants "2:4 f32,2:4 int8 a8,2:4 int4 g128 a8")
for side in before after; do
  dir="$ROOT"; [ "$side" = before ] && dir="$WT"
  echo "== $side: $(git -C "$dir" log --oneline -1)"
  (cd "$dir" && OPENBLAS_NUM_THREADS=1 PYTHONPATH="$dir/src" env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \
     "$PY" benchmarks/bench_gemv.py "${GEMV_ARGS[@]}") > "$OUT/$side-gemv.txt" 2>&1
  (cd "$dir" && PYTHONPATH="$dir/src" "$PY" benchmarks/bench_storage.py --quick --pruned "$ROOT/outputs/bench_storage/smollm2-2of4" \
     --work "$OUT/$side-storage-work") > "$OUT/$side-storage.txt" 2>&1 || echo "storage ($side) failed: see $OUT/$side-storage.txt"
  (cd "$dir" && PYTHONPATH="$dir/src" "$PY" -u benchmarks/bench_merge_speed.py --methods ties,linear,dare_ties) > "$OUT/$side-merge.txt" 2>&1
done
tail -n 15 "$OUT"/*-gemv.txt "$OUT"/*-merge.txt
