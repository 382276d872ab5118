"""``sparsemerge serve STORE``: the task store behind an OpenAI-shaped HTTP API
(:mod:`sparsemerge.deploy.server`)."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a task store over an OpenAI-shaped HTTP API (one base, many tasks)",
                       description="Load STORE's base once, switch tasks in memory between requests, and answer "
                       "GET /v1/models, POST /v1/completions and POST /v1/chat/completions (model = a task, 'base' "
                       "or '0.5*a+0.5*b'; streaming by server-sent events). Ctrl-C stops it.")
    p.add_argument("store", metavar="STORE", help="a task store (sparsemerge store init)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one)")
    p.add_argument("--max-seq", type=int, default=2048, help="context: prompt + generated tokens")
    p.add_argument("--cache-mb", type=float, default=1024, help="LRU cache of task combinations, MB")
    p.add_argument("--burst", type=int, default=8, help="requests of one task served in a row while others wait")
    p.add_argument("--act-quant", choices=["none", "int8"], default="none", help="INT8 activations for INT8/INT4 layers")
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import sys

    from sparsemerge.deploy.server import TaskServer
    from sparsemerge.errors import SparsemergeError

    if not 0 <= args.port <= 65535:
        raise SparsemergeError(f"--port must be in 0..65535, got {args.port}")
    try:
        server = TaskServer(args.store, args.host, args.port, max_seq=args.max_seq, cache_bytes=int(args.cache_mb * 2**20),
                            burst=args.burst, act_quant=args.act_quant)
    except OSError as exc:
        raise SparsemergeError(f"cannot listen on {args.host}:{args.port} ({exc})") from None
    print(f"serving {len(server.models()) - 1} task(s) of {args.store} at {server.url}/v1 (Ctrl-C stops)", flush=True)
    server.serve_forever()
    print("stopped", file=sys.stderr, flush=True)
    return 0
