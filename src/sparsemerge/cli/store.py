"""``sparsemerge store init|add|list|verify|remove``: the task store of one sparse base and
many compressed tasks (:mod:`sparsemerge.deploy.store`)."""
from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("store", help="a task store: one packed base + compressed task vectors / LoRA adapters",
                       description="Keep one packed base model and many tasks (sparse INT8/INT4 task vectors aligned "
                       "to the base's N:M slots or top-k, PEFT LoRA adapters) in one folder, with checksums and "
                       "version chains (a new version is stored as a delta against the previous one).")
    ss = p.add_subparsers(dest="store_command", metavar="ACTION")
    ss.required = True

    q = ss.add_parser("init", help="create a store around a packed base model")
    q.add_argument("store", metavar="STORE", help="the store folder to create")
    q.add_argument("--base", required=True, metavar="PACKED", help="a packed model (sparsemerge pack), any format")
    q.add_argument("--overwrite", action="store_true", help="replace STORE if it exists")
    q.set_defaults(func=run_init)

    q = ss.add_parser("add", help="add a task (or a new version of one)")
    q.add_argument("store", metavar="STORE")
    q.add_argument("name", metavar="NAME", help="task name (letters, digits, '.', '_', '-')")
    q.add_argument("source", metavar="SOURCE", help="the fine-tuned model (HF folder, safetensors, packed folder) "
                   "whose difference to the base is the task vector, or a PEFT LoRA adapter folder")
    q.add_argument("--new-version", action="store_true", help="NAME exists: store SOURCE as its next version (a delta)")
    q.add_argument("--select", choices=["nm", "topk"], default=None,
                   help="nm: keep tau at the base's N:M slots only, so base + task keeps the pattern (default for an "
                   "N:M base); topk: the largest |tau| anywhere")
    q.add_argument("--density", type=float, default=None, help="share of tau kept per tensor, in (0, 1] (default 0.1; "
                   "a new version: its first version's)")
    q.add_argument("--quant", choices=["int8", "int4", "none"], default="int8", help="codec of the stored values")
    q.add_argument("--group-size", type=int, default=128, help="stored values per scale (0: per row)")
    q.add_argument("--finetuned-from", metavar="MODEL", default=None,
                   help="the model SOURCE was fine-tuned from, when not the base (e.g. the dense model the base was "
                   "pruned from): tau = SOURCE - MODEL, applied to the base")
    q.set_defaults(func=run_add)

    q = ss.add_parser("list", help="tasks, versions and their sizes against the base")
    q.add_argument("store", metavar="STORE")
    q.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    q.set_defaults(func=run_list)

    q = ss.add_parser("verify", help="check every checksum and version chain end to end (exit 1 on a problem)")
    q.add_argument("store", metavar="STORE")
    q.add_argument("name", metavar="NAME", nargs="?", default=None, help="one task only")
    q.set_defaults(func=run_verify)

    q = ss.add_parser("remove", help="remove a task, or only its latest version")
    q.add_argument("store", metavar="STORE")
    q.add_argument("name", metavar="NAME")
    q.add_argument("--version", type=int, default=None, help="remove only this (the latest) version")
    q.set_defaults(func=run_remove)


def run_init(args: argparse.Namespace) -> int:
    from sparsemerge.deploy.store import TaskStore

    store = TaskStore.init(args.store, args.base, overwrite=args.overwrite)
    print(f"store {args.store}: base {store.base_nbytes / 1e6:.2f} MB, {len(store.index['base']['nm'])} N:M tensors")
    return 0


def run_add(args: argparse.Namespace) -> int:
    from sparsemerge.deploy.store import TaskStore

    store = TaskStore(args.store)
    entry = store.add(args.name, args.source, select=args.select, density=args.density, quant=args.quant,
                      group_size=args.group_size, new_version=args.new_version, finetuned_from=args.finetuned_from)
    share = entry.get("on_pattern_energy")
    extra = "" if share is None else f", {100 * share:.1f}% of |tau|^2 on the base's pattern"
    print(f"task {args.name} v{entry['task_version']} ({entry['kind']}): {entry['nbytes'] / 1e6:.3f} MB, "
          f"{100 * entry['nbytes'] / store.base_nbytes:.1f}% of the base{extra}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    from sparsemerge.cli.common import format_table
    from sparsemerge.deploy.store import TaskStore

    store = TaskStore(args.store)
    rows = store.list_rows()
    if args.json:
        print(json.dumps({"base_bytes": store.base_nbytes, "tasks": rows}, indent=1))
        return 0
    print(f"base: {store.base_nbytes:,} bytes")
    table = [[r["task"], f"v{r['version']}", r["kind"], r["options"], f"{r['bytes']:,}", f"{100 * r['of_base']:.1f}%",
              f"{100 * r['chain_of_base']:.1f}%"] for r in rows]
    print(format_table(["task", "version", "kind", "options", "bytes", "of base", "chain of base"], table))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from sparsemerge.deploy.store import TaskStore

    store = TaskStore(args.store)
    problems = store.verify(args.name)
    for p in problems:
        print(f"FAILED: {p}", file=sys.stderr)
    if problems:
        return 1
    what = f"task {args.name}" if args.name else f"base and {len(store.tasks())} task(s)"
    print(f"ok: {what} verified (files, chains, reconstructions)")
    return 0


def run_remove(args: argparse.Namespace) -> int:
    from sparsemerge.deploy.store import TaskStore

    TaskStore(args.store).remove(args.name, args.version)
    print(f"removed {args.name}" + (f" v{args.version}" if args.version else ""))
    return 0
