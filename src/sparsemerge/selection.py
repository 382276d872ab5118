"""Layer selection shared by pruning, packing, merging, kernels and training: which modules a
transform touches (include/exclude regexes on qualified module names) and how a module is
swapped for another in place.

A module named ``name`` (e.g. ``model.layers.3.mlp.up_proj``) is selected when some include
regex matches somewhere in it (``re.search``) and no exclude regex does. The defaults pick the
Linear layers inside the repeated transformer blocks and keep embeddings, the output head and
norms dense (chapter 10.1.6).
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Optional

from torch import nn

from sparsemerge.errors import SparsemergeError

# Linear weights inside the repeated transformer blocks (…layers.3.mlp.up_proj, …h.3.attn.c_fc).
# Shared lists: copy them (``list(DEFAULT_INCLUDE)``) before changing one.
DEFAULT_INCLUDE = [r"(^|\.)(layers|layer|h|blocks|block|decoder\.layers|encoder\.layer)\.\d+\..*"]
# Embeddings, the output head and norms stay dense (chapter 10.1.6), and so do MoE routers
# ([experts, hidden]: tiny, and every token's choice of experts depends on them; llm-compressor's
# MoE recipes ignore "re:.*mlp.gate$" for the same reason).
DEFAULT_EXCLUDE = [r"(^|\.)(lm_head|embed_tokens|wte|wpe|embed_out|output)$", r"norm", r"(^|\.)mlp\.(gate|shared_expert_gate)$"]

_WEIGHT = ".weight"


def compile_regexes(texts: Iterable[str], what: str) -> list[re.Pattern[str]]:
    """Compile each regex once; a bad one raises :class:`SparsemergeError` naming ``what``
    (e.g. ``"include"``) and the regex."""
    out = []
    for text in texts:
        if not isinstance(text, str):
            raise SparsemergeError(f"{what} regexes must be strings, got {text!r} ({type(text).__name__})")
        try:
            out.append(re.compile(text))
        except re.error as exc:
            raise SparsemergeError(f"bad {what} regex {text!r}: {exc}") from None
    return out


class LayerFilter:
    """``filter(name)`` is True when ``name`` matches an include regex and no exclude regex.

    ``include=None`` selects every name (only ``exclude`` filters); an empty include list
    selects nothing. Callers that fall back to the defaults pass them explicitly
    (``LayerFilter(DEFAULT_INCLUDE, DEFAULT_EXCLUDE)`` or :meth:`default`).
    """

    def __init__(self, include: Optional[Iterable[str]] = None, exclude: Optional[Iterable[str]] = None) -> None:
        self.include = None if include is None else compile_regexes(include, "include")
        self.exclude = compile_regexes(exclude or [], "exclude")

    @classmethod
    def default(cls) -> "LayerFilter":
        return cls(DEFAULT_INCLUDE, DEFAULT_EXCLUDE)

    def __call__(self, name: str) -> bool:
        if self.include is not None and not any(rx.search(name) for rx in self.include):
            return False
        return not any(rx.search(name) for rx in self.exclude)

    def weight(self, tensor_name: str) -> bool:
        """For checkpoint tensors: ``NAME.weight`` is selected when its module ``NAME`` is;
        any other tensor (biases, buffers) is not."""
        return tensor_name.endswith(_WEIGHT) and self(tensor_name[: -len(_WEIGHT)])

    def __repr__(self) -> str:
        inc = None if self.include is None else [rx.pattern for rx in self.include]
        return f"LayerFilter(include={inc}, exclude={[rx.pattern for rx in self.exclude]})"


def replace_module(model: nn.Module, dotted_name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where the submodule ``dotted_name`` (as in ``named_modules()``) sits in
    ``model``; returns the module it replaced."""
    if not dotted_name:
        raise SparsemergeError("replace_module needs a submodule name; the root module cannot be replaced in place")
    parent_name, _, child = dotted_name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError:
        raise SparsemergeError(f"replace_module: {type(model).__name__} has no submodule {parent_name!r}") from None
    old = parent._modules.get(child)
    if old is None:
        raise SparsemergeError(f"replace_module: {type(model).__name__} has no submodule {dotted_name!r}")
    setattr(parent, child, new)
    return old


DENSE = "dense"  # a per-layer pattern value: keep the layer dense


class LayerPatterns:
    """Module name -> its pattern string (or ``"dense"``): the first override regex that
    matches (``re.search``), else ``default``. The per-layer patterns of a mixed allocation
    (recipe ``layer_patterns``, or the pattern each layer was pruned to) for ``check`` and ``pack``."""

    def __init__(self, default: str, overrides: Optional[dict[str, str]] = None) -> None:
        self.default = default
        overrides = overrides or {}
        self.overrides = list(zip(compile_regexes(overrides, "layer_patterns"), overrides.values()))

    @classmethod
    def exact(cls, default: str, patterns: dict[str, str]) -> "LayerPatterns":
        """Overrides keyed by exact module names (anchored, escaped)."""
        return cls(default, {f"^{re.escape(name)}$": p for name, p in patterns.items()})

    def __call__(self, module_name: str) -> str:
        return next((p for rx, p in self.overrides if rx.search(module_name)), self.default)

    @property
    def mixed(self) -> bool:
        return any(p != self.default for _, p in self.overrides)
