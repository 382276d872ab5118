"""Compile hand-written LLVM IR for this CPU with llvmlite (numba's own LLVM; no C toolchain).

The batch-1 kernels that need instructions numba cannot express (``vpermi2b``/``vpermi2ps``,
``vpmultishiftqb``, ``vpdpbusd``, ``vgf2p8affineqb``) are written as LLVM IR text and compiled
here once per process; numba functions call them through ctypes function pointers (numba
releases no GIL for those calls, they are plain C calls).
"""
from __future__ import annotations

import ctypes
from typing import Iterable

_ENGINES: list = []  # keep the machine code alive for the life of the process


def features_missing(required: Iterable[str]) -> list[str]:
    """The names in ``required`` (LLVM feature names, e.g. ``avx512vnni``) this CPU lacks."""
    import llvmlite.binding as llvm

    features = llvm.get_host_cpu_features()
    return [f for f in required if not features.get(f, False)]


def compile_functions(ir: str, signatures: dict[str, ctypes._CFuncPtr], cpu: "str | None" = None,
                      features: "str | None" = None) -> dict:
    """Compile the module ``ir`` (repeated ``declare`` lines are merged) at -O3 and return
    ``{name: ctypes function}`` for each ``name -> CFUNCTYPE`` in ``signatures``. By default
    for the host CPU; ``cpu``/``features`` (LLVM names, e.g. ``"x86-64-v3"``, ``"+avxvnni"``)
    target a lesser one, so that the AVX2 kernels stay AVX2 code on an AVX-512 machine."""
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    seen, lines = set(), []
    for line in ir.splitlines():
        if line.startswith("declare"):
            if line in seen:
                continue
            seen.add(line)
        lines.append(line)
    module = llvm.parse_assembly("\n".join(lines))
    module.verify()
    machine = llvm.Target.from_default_triple().create_target_machine(
        cpu=cpu or llvm.get_host_cpu_name(),
        features=llvm.get_host_cpu_features().flatten() if features is None and cpu is None else (features or ""), opt=3
    )
    engine = llvm.create_mcjit_compiler(module, machine)
    engine.finalize_object()
    _ENGINES.append(engine)
    return {name: proto(engine.get_function_address(name)) for name, proto in signatures.items()}
