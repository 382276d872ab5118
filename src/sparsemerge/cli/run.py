"""``sparsemerge run`` (generate text with SparseLinear layers) and ``sparsemerge bench``
(decoding tokens/s, memory and load time against the dense model, in one process)."""
from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import time

from sparsemerge.cli.common import format_table
from sparsemerge.errors import SparsemergeError

log = logging.getLogger(__name__)


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


def register(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("run", help="generate text from a packed or pruned model with sparse kernels",
                       description="Load MODEL with its N:M layers as SparseLinear and generate greedily from --prompt.")
    _add_model_options(r)
    r.add_argument("--prompt", required=True, help="text to continue")
    r.add_argument("--max-new-tokens", type=int, default=32)
    r.add_argument("--dense", action="store_true", help="run the dense float32 model instead (for comparison)")
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


def _setup(args: argparse.Namespace):
    import torch

    if args.threads is not None:
        if args.threads < 1:
            raise SparsemergeError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.device not in ("cpu", "cuda"):
        raise SparsemergeError(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SparsemergeError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    from sparsemerge.kernels.dispatch import force_kernel

    if args.kernel != "auto":
        return force_kernel(args.kernel)  # an unknown name fails with the known list
    return contextlib.nullcontext()


def _load(args: argparse.Namespace, dense: bool):
    import torch

    from sparsemerge.kernels.model import load_for_run

    threads = torch.get_num_threads()
    loaded = load_for_run(args.model, quant=args.quant, group_size=args.group_size, pattern=args.pattern, prune=args.prune,
                          dense=dense, head_quant=args.head_quant, act_quant=args.act_quant)
    # numba kernels run while loading (OpenMP layer) reset torch's OpenMP thread count
    torch.set_num_threads(threads)
    if args.device != "cpu":
        loaded.model.to(args.device)
    return loaded


def run_run(args: argparse.Namespace) -> int:
    import torch

    with _setup(args):
        loaded = _load(args, dense=args.dense)
        if loaded.tokenizer is None:
            raise SparsemergeError(f"{args.model!r} has no tokenizer; run needs one to encode --prompt")
        ids = loaded.tokenizer(args.prompt, return_tensors="pt").input_ids.to(args.device)
        start = time.perf_counter()
        with torch.no_grad():
            out = loaded.model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                                        pad_token_id=loaded.tokenizer.eos_token_id)
        seconds = time.perf_counter() - start
    new = out[0, ids.shape[1]:]
    print(args.prompt + loaded.tokenizer.decode(new, skip_special_tokens=True))
    print(f"[{loaded.kind}: {len(loaded.swapped)} sparse layers, load {loaded.load_seconds:.1f} s, "
          f"{len(new)} tokens in {seconds:.2f} s]", flush=True)
    return 0


def decode_seconds(model, ids, tokens: int) -> float:
    """Seconds for ``tokens`` greedy decoding steps after the prompt (KV cache on)."""
    import torch

    with torch.no_grad():
        out = model(ids, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(tokens):
            out = model(nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
        if nxt.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmHWM``: peak resident memory); 0 elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _peak_memory_child(args: argparse.Namespace, dense: bool, queue) -> None:
    """In a fresh process: resident memory after the imports, then the peak over loading the
    model and decoding a few tokens (what running it costs, JIT-compiled kernels included)."""
    try:
        import torch

        import sparsemerge.kernels.model  # noqa: F401 - the imports, measured as the baseline
        import transformers  # noqa: F401

        base = rss_bytes()
        with _setup(args):
            loaded = _load(args, dense)
            ids = torch.zeros((1, args.prompt_tokens), dtype=torch.long, device=args.device)
            decode_seconds(loaded.model, ids, 4)
        queue.put((base, status_kib("VmHWM") * 1024))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which prints it
        queue.put(repr(exc))


def peak_memory(args: argparse.Namespace, dense: bool) -> "tuple[int, int] | str":
    """``(resident bytes after imports, peak resident bytes)`` of loading and decoding with
    ``args`` in a fresh process (spawned: nothing inherited from this one), or why not."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_memory_child, args=(argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "func"}), dense, queue))
    proc.start()
    try:
        result = queue.get(timeout=1800)
    except Exception as exc:  # noqa: BLE001 - queue.Empty or a dead child
        result = f"no result ({exc!r})"
    proc.join(timeout=60)
    return result


def bench_rows(args: argparse.Namespace) -> list[tuple]:
    import torch

    from sparsemerge.kernels.model import model_bytes

    variants = [("sparse", False)] + ([] if args.no_dense else [("dense float32", True)])
    loaded = {}
    for label, dense in variants:
        gc.collect()
        loaded[label] = _load(args, dense)
    torch.manual_seed(0)
    vocab = loaded["sparse"].model.config.vocab_size
    ids = torch.randint(0, vocab, (1, args.prompt_tokens), device=args.device)
    best = {label: float("inf") for label in loaded}
    for label in loaded:  # warm-up (numba compile, caches)
        decode_seconds(loaded[label].model, ids, 2)
    for _ in range(args.repeats):
        for label in loaded:
            best[label] = min(best[label], decode_seconds(loaded[label].model, ids, args.tokens))
    base = best.get("dense float32")
    peaks = {}
    if not getattr(args, "no_peak_memory", False):
        for label, dense in variants:
            peaks[label] = peak_memory(args, dense)
            if isinstance(peaks[label], str):
                log.warning("peak memory of %s not measured: %s", label, peaks[label])
    rows = []
    for label, item in loaded.items():
        tps = args.tokens / best[label]
        ratio = base / best[label] if base else float("nan")
        peak = peaks.get(label)
        peak_mib = (peak[1] - peak[0]) / 2**20 if isinstance(peak, tuple) else float("nan")
        rows.append((label, item.kind, len(item.swapped), item.load_seconds, model_bytes(item.model) / 2**20,
                     peak_mib, tps, ratio))
    return rows


def run_bench(args: argparse.Namespace) -> int:
    if args.tokens < 1 or args.repeats < 1 or args.prompt_tokens < 1:
        raise SparsemergeError("--tokens, --prompt-tokens and --repeats must be >= 1")
    with _setup(args):
        rows = bench_rows(args)
    print(format_table(["model", "kind", "sparse layers", "load s", "weights MiB", "peak RSS +MiB", "tokens/s", "x dense"], rows))
    import torch

    print(f"decoding {args.tokens} tokens after a {args.prompt_tokens}-token prompt, batch 1, best of {args.repeats}, "
          f"{torch.get_num_threads()} threads, device {args.device}; peak RSS +MiB: resident memory at the peak of "
          "loading and decoding, in a fresh process, above what the imports alone take")
    return 0
