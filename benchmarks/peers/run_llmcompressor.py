"""Run llm-compressor's one-shot SparseGPT or Wanda 2:4 (peer side of bench_calibrated.py).

Runs inside .venv-peers/llmcompressor (see setup_llmcompressor.sh). Reads the calibration
token ids that the benchmark saved (a (nsamples, seqlen) LongTensor), builds a
``datasets.Dataset`` of exactly those ``input_ids``, calls ``oneshot`` and writes all the
parameters (tied ones once) to OUT/pruned.safetensors plus OUT/timing.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, help="Hugging Face folder of the dense model")
    p.add_argument("--calib", required=True, help=".pt file with a (nsamples, seqlen) LongTensor")
    p.add_argument("--method", choices=["sparsegpt", "wanda"], required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--ignore", action="append", help="ignore list (default: lm_head, as in the issue)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    ids = torch.load(args.calib)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    common = dict(sparsity=0.5, mask_structure="2:4", targets=["Linear"], ignore=args.ignore or ["lm_head"])
    if args.method == "sparsegpt":
        recipe = SparseGPTModifier(**common)
    else:
        recipe = WandaPruningModifier(**common)
    t0 = time.perf_counter()
    oneshot(
        model=model,
        dataset=dataset,
        recipe=recipe,
        max_seq_length=ids.shape[1],
        num_calibration_samples=ids.shape[0],
        shuffle_calibration_samples=False,
        batch_size=args.batch_size,
    )
    oneshot_s = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # every parameter (tied embeddings once): llm-compressor may also touch lm_head
    weights = {name: p.detach().to(torch.float32).contiguous() for name, p in model.named_parameters()}
    save_file(weights, str(out / "pruned.safetensors"))
    total_s = time.perf_counter() - start
    (out / "timing.json").write_text(json.dumps({"oneshot_s": oneshot_s, "script_s": total_s, "tensors": len(weights)}))


if __name__ == "__main__":
    main()
