"""The execution plan as a table (``sparsemerge plan``)."""
from __future__ import annotations

import re


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def plan_table(plan, collapse: bool = True) -> str:
    lines = [f"architecture {plan.arch}; CPU {plan.cpu}; activations {'int8' if plan.act_quant == 'int8' else 'float32'}"]
    if not plan.supported:
        lines.append(f"decode runtime: not used - {plan.reason}; the transformers path runs this model")
        return "\n".join(lines)
    rows = []
    if collapse:
        groups: dict = {}
        for p in plan.layers:
            m = re.match(r"model\.layers\.(\d+)\.(.*)", p.name)
            key = (m.group(2) if m else p.name, p.rows, p.cols, p.pattern, p.codec, p.kernel, p.bytes, p.why)
            groups.setdefault(key, []).append(int(m.group(1)) if m else None)
        for key, idx in groups.items():
            name = key[0] if idx == [None] else f"layers.{_ranges(idx)}.{key[0]}"
            rows.append((name, f"{key[1]}x{key[2]}", key[3], key[4], key[5], _fmt_bytes(key[6]) + (f" x{len(idx)}" if len(idx) > 1 else ""), key[7]))
    else:
        rows = [(p.name, f"{p.rows}x{p.cols}", p.pattern, p.codec, p.kernel, _fmt_bytes(p.bytes), p.why) for p in plan.layers]
    head = ("layer", "shape", "pattern", "codec", "kernel", "bytes/token", "why")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head) - 1)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
    lines.append(fmt.format(*head))
    lines.append(fmt.format(*["-" * w for w in widths], "-" * 3))
    lines += [fmt.format(*r) for r in rows]
    counts = ", ".join(f"{k} x{v}" for k, v in sorted(plan.kernel_counts().items()))
    lines.append(f"{len(plan.layers)} products per token, {_fmt_bytes(plan.total_bytes)} of weights read; kernels: {counts}")
    return "\n".join(lines)


def _ranges(idx: list[int]) -> str:
    """[0, 1, 2, 5] -> "{0-2,5}"; [3] -> "3"."""
    idx = sorted(idx)
    runs, start = [], idx[0]
    for a, b in zip(idx, idx[1:] + [None]):
        if b != a + 1:
            runs.append(str(a) if a == start else f"{start}-{a}")
            start = b
    return runs[0] if runs == [str(idx[0])] else "{" + ",".join(runs) + "}"
