"""``sparsemerge run`` (generate text with SparseLinear layers) and ``sparsemerge bench``
(decoding tokens/s, memory and load time against the dense model, in one process; the
measurements live in :mod:`sparsemerge.eval.speed` and :mod:`sparsemerge.eval.memory`)."""
from __future__ import annotations

import argparse
import time

from sparsemerge.cli.common import format_table
from sparsemerge.errors import SparsemergeError
from sparsemerge.eval.speed import BENCH_HEADERS, DEVICES, RunSpec, bench_decoding


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="packed checkpoint folder (sparsemerge pack), pruned HF folder, .safetensors/.gguf, or smollm2")
    p.add_argument("--quant", choices=["none", "int8", "int4"], default="none", help="codec when converting an HF folder on load (default none)")
    p.add_argument("--group-size", type=int, default=None, help="stored values per quantization scale (default: one per output channel)")
    p.add_argument("--pattern", default="2:4", help="N:M pattern of the layers when converting an HF folder (default 2:4)")
    p.add_argument("--head-quant", choices=["none", "int8"], default="none", help="also run the dense lm_head in INT8 per channel")
    p.add_argument("--act-quant", choices=["none", "int8"], default="none",
                   help="int8: quantize decoding inputs per block of 256 and run 2:4 INT8/INT4 layers with the "
                   "AVX-512 VNNI kernel (faster; adds activation rounding error)")
    p.add_argument("--prune", action="store_true", help="apply the magnitude N:M mask to layers that are not N:M yet")
    p.add_argument("--kernel", default="auto", help="auto (default), cpu, cuda, reference or a kernel row "
                   "(e.g. numba-gemv24; the rows: sparsemerge.kernels.backends)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and numba (default: all cores)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--runtime", choices=["auto", "off"], default="auto",
                   help="auto (default): the compiled decode runtime for the models it supports (Llama, Mistral, "
                   "Qwen2 shapes; see `sparsemerge plan`), transformers otherwise; off: always transformers")
    p.add_argument("--kv-cache", choices=["auto", "float16", "float32"], default="auto",
                   help="the decode runtime's KV cache: auto (default) float16 where the CPU converts it in hardware "
                   "(half the cache memory and attention's reads), float32 otherwise; float32 keeps transformers' values")


def register(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("run", help="generate text from a packed or pruned model with sparse kernels",
                       description="Load MODEL with its N:M layers as SparseLinear and generate greedily from --prompt.")
    _add_model_options(r)
    r.add_argument("--prompt", required=True, help="text to continue")
    r.add_argument("--max-new-tokens", type=int, default=32)
    r.add_argument("--dense", action="store_true", help="run the dense float32 model instead (for comparison)")
    r.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0 samples")
    r.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    r.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: the smallest set with this mass")
    r.add_argument("--seed", type=int, default=None, help="seed for sampling")
    r.add_argument("--stop", action="append", default=[], help="stop when the text contains this string (repeatable)")
    r.set_defaults(func=run_run)

    b = sub.add_parser("bench", help="decoding tokens/s, memory and load time: sparse vs dense, one process",
                       description="Time greedy decoding of MODEL with SparseLinear layers and of the dense float32 model, interleaved.")
    _add_model_options(b)
    b.add_argument("--tokens", type=int, default=32, help="decoded tokens per repetition (default 32)")
    b.add_argument("--prompt-tokens", type=int, default=16, help="prompt length in tokens (default 16)")
    b.add_argument("--repeats", type=int, default=3, help="interleaved repetitions; the best of each is reported (default 3)")
    b.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
    b.add_argument("--no-peak-memory", action="store_true",
                   help="skip measuring each model's peak memory in a fresh process (saves a load per model)")
    b.set_defaults(func=run_bench)


def _spec(args: argparse.Namespace) -> RunSpec:
    """Validate the options (errors name the flags) and describe the run for the library."""
    if args.threads is not None and args.threads < 1:
        raise SparsemergeError(f"--threads must be >= 1, got {args.threads}")
    if args.device not in DEVICES:
        raise SparsemergeError(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SparsemergeError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return RunSpec(model=args.model, quant=args.quant, group_size=args.group_size, pattern=args.pattern, prune=args.prune,
                   head_quant=args.head_quant, act_quant=args.act_quant, kernel=args.kernel, threads=args.threads,
                   device=args.device, runtime=args.runtime, kv_cache=args.kv_cache)


def run_run(args: argparse.Namespace) -> int:
    import torch

    from sparsemerge.runtime.sampling import SamplingConfig

    if args.max_new_tokens < 1:
        raise SparsemergeError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    try:
        sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except ValueError as exc:
        raise SparsemergeError(f"bad sampling option: {exc.errors()[0]['loc'][0]} {exc.errors()[0]['msg']}") from None
    spec = _spec(args)
    with spec.setup():
        loaded = spec.load(dense=args.dense)
        if loaded.tokenizer is None:
            raise SparsemergeError(f"{args.model!r} has no tokenizer; run needs one to encode --prompt")
        ids = loaded.tokenizer(args.prompt, return_tensors="pt").input_ids.to(args.device)
        if ids.shape[1] == 0:
            raise SparsemergeError("the prompt is empty: give at least one token")
        positions = getattr(getattr(loaded.model, "config", None), "max_position_embeddings", None)
        if isinstance(positions, int) and ids.shape[1] + args.max_new_tokens > positions:
            raise SparsemergeError(
                f"{ids.shape[1]} prompt tokens + --max-new-tokens {args.max_new_tokens} exceed the model's "
                f"{positions} positions (max_position_embeddings); lower --max-new-tokens to at most {max(positions - ids.shape[1], 0)}"
            )
        engine, why = spec.decoder(loaded, max_seq=ids.shape[1] + args.max_new_tokens + 1)
        print(args.prompt, end="", flush=True)
        start = time.perf_counter()
        if engine is not None:  # tokens stream as they are made
            res = engine.generate(ids[0].tolist(), args.max_new_tokens, sampling, args.stop,
                                  on_token=lambda t, piece: print(piece, end="", flush=True))
            n, stop_reason = len(res.tokens), res.stop_reason
        else:
            from transformers import LogitsProcessorList

            from sparsemerge.runtime.sampling import finite_logits_processor

            with torch.no_grad():
                out = loaded.model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=sampling.temperature > 0,
                                            logits_processor=LogitsProcessorList([finite_logits_processor()]),
                                            temperature=sampling.temperature or None, top_k=sampling.top_k or None,
                                            top_p=sampling.top_p, pad_token_id=loaded.tokenizer.eos_token_id)
            text = loaded.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            hit = next((s for s in args.stop if s and s in text), None)
            print(text if hit is None else text[: text.index(hit)], end="")
            n, stop_reason = out.shape[1] - ids.shape[1], "stop string" if hit else "length or eos"
        seconds = time.perf_counter() - start
    path = "decode runtime" if engine is not None else f"transformers ({why})"
    print(f"\n[{loaded.kind}: {len(loaded.swapped)} sparse layers, {path}, load {loaded.load_seconds:.1f} s, "
          f"{n} tokens in {seconds:.2f} s, stopped: {stop_reason}]", flush=True)
    return 0


def run_bench(args: argparse.Namespace) -> int:
    if args.tokens < 1 or args.repeats < 1 or args.prompt_tokens < 1:
        raise SparsemergeError("--tokens, --prompt-tokens and --repeats must be >= 1")
    spec = _spec(args)
    with spec.setup():
        rows = bench_decoding(spec, tokens=args.tokens, prompt_tokens=args.prompt_tokens, repeats=args.repeats,
                              dense=not args.no_dense, peak_memory=not args.no_peak_memory)
    print(format_table(BENCH_HEADERS, [r.as_tuple() for r in rows]))
    for r in rows:
        if r.path != "runtime" and args.runtime == "auto":
            print(f"{r.label}: transformers path because {r.why}")
    import torch

    print(f"decoding {args.tokens} tokens after a {args.prompt_tokens}-token prompt, batch 1, best of {args.repeats}, "
          f"{torch.get_num_threads()} threads, device {args.device}; peak RSS +MiB: resident memory at the peak of "
          "loading and decoding, in a fresh process, above what the imports alone take")
    return 0
