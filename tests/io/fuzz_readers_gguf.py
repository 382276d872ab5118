"""Fuzzed GGUF files through the project's entry point for them (``open_tensor_source`` ->
:func:`sparsemerge.io.sources.gguf_as_hf_folder`: GGUF checks, then transformers dequantizes
into a cached Hugging Face folder). The seed is a valid one-block Llama (hidden size 8, a
byte-level BPE vocabulary of 258 tokens) written with the ``gguf`` package's GGUFWriter."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import strategies as st

from fuzz_testlib import Reader, apply_byte_edits, note, mutate_bytes, tolerate

HIDDEN, FFN, HEADS, KV_HEADS = 8, 16, 2, 1


def seed_spec() -> tuple[list[tuple[str, Any, str]], list[tuple[str, tuple[int, ...]]]]:
    """(metadata as (key, value, kind), tensors as (name, numpy shape)) of the seed model."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = list(bytes_to_unicode().values()) + ["ab", "<|endoftext|>"]
    n = len(tokens)
    kvs = [
        ("general.architecture", "llama", "str"), ("general.name", "tiny", "str"),
        ("llama.context_length", 32, "u32"), ("llama.embedding_length", HIDDEN, "u32"), ("llama.block_count", 1, "u32"),
        ("llama.feed_forward_length", FFN, "u32"), ("llama.attention.head_count", HEADS, "u32"),
        ("llama.attention.head_count_kv", KV_HEADS, "u32"), ("llama.attention.layer_norm_rms_epsilon", 1e-5, "f32"),
        ("llama.rope.freq_base", 10000.0, "f32"), ("tokenizer.ggml.model", "gpt2", "str"), ("tokenizer.ggml.pre", "default", "str"),
        ("tokenizer.ggml.tokens", tokens, "arr"), ("tokenizer.ggml.token_type", [1] * (n - 1) + [3], "arr"),
        ("tokenizer.ggml.merges", ["a b"], "arr"), ("tokenizer.ggml.bos_token_id", n - 1, "u32"),
        ("tokenizer.ggml.eos_token_id", n - 1, "u32"),
    ]
    kv_dim = HIDDEN // HEADS * KV_HEADS
    tensors = [("token_embd.weight", (n, HIDDEN)), ("blk.0.attn_norm.weight", (HIDDEN,)), ("blk.0.attn_q.weight", (HIDDEN, HIDDEN)),
               ("blk.0.attn_k.weight", (kv_dim, HIDDEN)), ("blk.0.attn_v.weight", (kv_dim, HIDDEN)),
               ("blk.0.attn_output.weight", (HIDDEN, HIDDEN)), ("blk.0.ffn_norm.weight", (HIDDEN,)),
               ("blk.0.ffn_gate.weight", (FFN, HIDDEN)), ("blk.0.ffn_up.weight", (FFN, HIDDEN)),
               ("blk.0.ffn_down.weight", (HIDDEN, FFN)), ("output_norm.weight", (HIDDEN,))]
    return kvs, tensors


def write_gguf(path: Path, kvs: list[tuple[str, Any, str]], tensors: list[tuple[str, tuple[int, ...], Any]]) -> None:
    """Write metadata and float32 tensors (``(name, shape, raw_shape or None)``: a raw shape
    that disagrees with the data declares sizes the file does not hold)."""
    import gguf

    V = gguf.GGUFValueType
    kinds = {"u32": V.UINT32, "u64": V.UINT64, "i64": V.INT64, "f32": V.FLOAT32, "bool": V.BOOL, "str": V.STRING}
    arch = next((v for k, v, _ in kvs if k == "general.architecture" and isinstance(v, str)), "llama")
    writer = gguf.GGUFWriter(str(path), arch)
    writer.kv_data[0].pop("general.architecture", None)  # written below, from the (edited) list
    for key, value, kind in kvs:
        if kind == "arr":
            writer.add_array(key, value)
        else:
            writer.add_key_value(key, value, kinds[kind])
    rng = np.random.default_rng(0)
    for name, shape, raw_shape in tensors:
        data = (rng.standard_normal(shape) / 4).astype(np.float32)
        writer.add_tensor(name, data, raw_shape=raw_shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


class GGUFSeeds:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.kvs, self.tensors = seed_spec()
        self.seed = folder / "seed.gguf"
        write_gguf(self.seed, self.kvs, [(n, s, None) for n, s in self.tensors])
        self.bytes = self.seed.read_bytes()
        self.fields = _length_fields(self.seed)
        self.cache = folder / "cache"

    def __repr__(self) -> str:
        return f"GGUFSeeds({str(self.folder)!r})"


def _length_fields(path: Path) -> list[int]:
    """Byte offsets of the seed's counts, lengths, dimensions and tensor offsets (the numbers
    that size what follows them): byte edits aim there half of the time."""
    import gguf

    reader = gguf.GGUFReader(path)
    base = reader.data.ctypes.data
    out = []
    for field in [*reader.fields.values(), *(t.field for t in reader.tensors)]:
        for part in field.parts:
            if part.dtype in (np.uint64, np.uint32) and part.size <= 4:
                out.append(part.ctypes.data - base)
    return sorted(set(out))[:4000]


ARCHES = ["llama", "mistral", "qwen2", "qwen2moe", "qwen3moe", "gpt2", "phi3", "gemma", "falcon", "t5", "bloom", "stablelm", "bogus", ""]
EXTRA_KEYS = ["llama.expert_count", "llama.expert_used_count", "llama.vocab_size", "llama.rope.dimension_count",
              "llama.attention.key_length", "llama.attention.value_length", "general.alignment", "llama.rope.scaling.type",
              "llama.rope.scaling.factor", "tokenizer.ggml.scores", "tokenizer.ggml.padding_token_id", "tokenizer.chat_template",
              "qwen2moe.expert_count", "qwen2moe.block_count", "general.file_type"]
INTS = [0, 1, 2, 3, 7, 8, 9, 255, 256, 258, 259, 2**16, 2**20, 2**31, 2**32 - 1, 2**32, 2**40, 2**63 - 1, -1, -(2**31)]
VALUES = st.one_of(
    st.sampled_from(INTS), st.integers(0, 64), st.sampled_from([0.0, -1.0, 1e30, float("nan"), float("inf")]), st.booleans(),
    st.sampled_from(ARCHES + ["gpt2", "llama", "a b", "\x00", "x" * 300]),
    st.lists(st.integers(0, 300), max_size=4), st.lists(st.sampled_from(["a", "b", "a b", "", "<|endoftext|>"]), max_size=4),
)
TENSOR_NAMES = ["blk.1.attn_q.weight", "blk.999999.ffn_up.weight", "blk.x.ffn_up.weight", "output.weight", "token_embd.weight",
                "blk.0.ffn_up_exps.weight", "rope_freqs.weight", ""]
SHAPES = [(), (0,), (1,), (HIDDEN,), (2 * HIDDEN, HIDDEN), (HIDDEN, 2**20), (2**31, 2**31), (2**40,), (1, 1, 1, 1, 1), (3, 5)]


def _kind(value: Any) -> "str | None":
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "u32" if 0 <= value < 2**32 else "u64" if 0 <= value < 2**64 else "i64" if value >= -(2**63) else None
    if isinstance(value, float):
        return "f32"
    if isinstance(value, str):
        return "str"
    if isinstance(value, list):
        return "arr" if value else None
    return None


@st.composite
def gguf_examples(draw: Any) -> tuple[str, list]:
    """("spec", edits of the model description: a metadata value replaced or dropped, a key
    added, the architecture changed, a tensor dropped, renamed or declared with another shape)
    or ("bytes", byte edits of the seed file, aimed at its length fields half of the time)."""
    if draw(st.integers(0, 2)) == 0:
        return "bytes", draw(mutate_bytes())
    edit = st.one_of(
        st.tuples(st.just("set"), st.integers(0, 64), VALUES),
        st.tuples(st.just("del"), st.integers(0, 64), st.none()),
        st.tuples(st.just("arch"), st.integers(0, 64), st.sampled_from(ARCHES)),
        st.tuples(st.just("tensor_drop"), st.integers(0, 64), st.none()),
        st.tuples(st.just("tensor_rename"), st.integers(0, 64), st.sampled_from(TENSOR_NAMES)),
        st.tuples(st.just("tensor_shape"), st.integers(0, 64), st.sampled_from(SHAPES)),
    )
    return "spec", draw(st.lists(edit, min_size=1, max_size=3))


def _apply_spec(seeds: GGUFSeeds, edits: list) -> tuple[list, list]:
    kvs = list(seeds.kvs)
    tensors = [(n, s, None) for n, s in seeds.tensors]
    for op, i, value in edits:
        keys = [k for k, _, _ in kvs] + EXTRA_KEYS
        key = keys[i % len(keys)]
        if op == "set" and _kind(value) is not None:
            kvs = [kv for kv in kvs if kv[0] != key] + [(key, value, _kind(value))]
        elif op == "del":
            kvs = [kv for kv in kvs if kv[0] != key]
        elif op == "arch":
            kvs = [kv for kv in kvs if kv[0] != "general.architecture"] + [("general.architecture", value, "str")]
        elif tensors and op.startswith("tensor"):
            j = i % len(tensors)
            name, shape, raw = tensors[j]
            if op == "tensor_drop":
                del tensors[j]
            elif op == "tensor_rename":
                tensors[j] = (value, shape, raw)
            else:
                tensors[j] = (name, shape, list(value))
    return kvs, tensors


def _read_gguf(seeds: GGUFSeeds, example: tuple[str, list]) -> None:
    from sparsemerge.io.tensors import open_tensor_source

    kind, edits = example
    path = seeds.folder / "fuzz.gguf"
    if kind == "bytes":
        path.write_bytes(apply_byte_edits(seeds.bytes, edits, aligned_to=seeds.fields))
    else:
        kvs, tensors = _apply_spec(seeds, edits)
        note(f"metadata {[(k, v if not isinstance(v, list) or len(v) < 8 else f'[{len(v)} items]') for k, v, _ in kvs]}")
        note(f"tensors {tensors}")
        try:
            write_gguf(path, kvs, tensors)
        except Exception as exc:  # GGUFWriter refuses some edits (a duplicate tensor name): nothing to read
            note(f"not writable: {exc!r}")
            return
    previous = os.environ.get("SPARSEMERGE_CACHE")
    os.environ["SPARSEMERGE_CACHE"] = str(seeds.cache)
    try:
        source = tolerate(lambda: open_tensor_source(str(path)))
        if source is not None:
            with source:
                for name in source.names():
                    tolerate(lambda: source.get(name))
    finally:
        if previous is None:
            os.environ.pop("SPARSEMERGE_CACHE", None)
        else:
            os.environ["SPARSEMERGE_CACHE"] = previous
        shutil.rmtree(seeds.cache, ignore_errors=True)  # every example converts afresh


GGUF = Reader(
    "gguf", setup=GGUFSeeds, strategy=gguf_examples(), read=_read_gguf,
    doc="open_tensor_source on edited GGUF files (metadata, tensor table, raw bytes)",
)
