"""The one safetensors reader, writer and dtype table (sparsemerge.io.reader/.writer/.dtypes),
checked against the reference implementation (safetensors.torch.save_file / load_file)."""
import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from sparsemerge.errors import SparsemergeError
from sparsemerge.io import dtypes
from sparsemerge.io.reader import SafetensorsFile, ShardReader, load_safetensors
from sparsemerge.io.writer import PlannedTensor, ShardedWriter, header_bytes, save_safetensors, tensor_bytes


def _raw(t: torch.Tensor) -> bytes:
    return bytes(tensor_bytes(t))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaN payloads and float8 included)."""
    return a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and _raw(a) == _raw(b)


def _random_tensor(gen: torch.Generator, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Random bytes viewed as ``dtype`` (every bit pattern, not just nice values); bool 0/1."""
    count = 1
    for d in shape:
        count *= d
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).to(torch.bool)
    raw = torch.randint(0, 256, (count * dtypes.itemsize(dtype),), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def _every_dtype(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, row in enumerate(dtypes.DTYPES):
        out[f"t.{row.code.lower()}"] = _random_tensor(gen, row.torch, (3, i % 4 + 1))
    out["empty"] = torch.zeros(0, 5)
    out["scalar"] = torch.tensor(2.5, dtype=torch.float64)
    return out


def test_dtype_table_matches_the_reference_library():
    from safetensors.torch import _TYPES  # safetensors' own code -> torch dtype table

    for code, dtype in _TYPES.items():
        if dtype in dtypes.BY_TORCH:
            assert dtypes.to_code(dtype) == code and dtypes.from_code(code) == dtype
    assert {row.torch for row in dtypes.DTYPES} <= set(_TYPES.values())
    assert dtypes.dtype_from_name("bfloat16") is torch.bfloat16 and dtypes.dtype_name(torch.float8_e4m3fn) == "float8_e4m3fn"
    assert dtypes.numpy_dtype(torch.float16).name == "float16" and dtypes.numpy_dtype(torch.int64).itemsize == 8
    with pytest.raises(SparsemergeError, match="no numpy equivalent"):
        dtypes.numpy_dtype(torch.bfloat16)
    with pytest.raises(SparsemergeError, match=r"manifest: unknown dtype 'float13'; known: .*float32"):
        dtypes.dtype_from_name("float13", "manifest")
    with pytest.raises(SparsemergeError, match="unsupported safetensors dtype 'F13'"):
        dtypes.from_code("F13")


def test_round_trip_against_save_file_and_load_file(tmp_path):
    tensors = _every_dtype()
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    save_safetensors(tensors, tmp_path / "ours.safetensors", metadata={"format": "pt"})
    # byte-identical to the reference writer: same order, header and padding
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    theirs = load_file(str(tmp_path / "ours.safetensors"))
    ours = load_safetensors(tmp_path / "ref.safetensors")
    assert set(theirs) == set(ours) == set(tensors)
    for name, t in tensors.items():
        assert _same(theirs[name], t) and _same(ours[name], t), name
    with SafetensorsFile(tmp_path / "ref.safetensors") as f:
        assert f.metadata == {"format": "pt"}
        assert f.keys() == sorted(tensors)
        assert f.info("t.bf16").dtype == torch.bfloat16 and f.info("t.bf16").shape == tuple(tensors["t.bf16"].shape)
        assert _same(f.get("t.f8_e4m3"), tensors["t.f8_e4m3"])
        with pytest.raises(SparsemergeError, match="'nope' is not in"):
            f.get("nope")


@settings(max_examples=25, deadline=None)
@given(
    entries=st.lists(
        st.tuples(st.text("abcxyz._", min_size=1, max_size=6), st.sampled_from(dtypes.DTYPES), st.lists(st.integers(0, 4), max_size=3)),
        max_size=6,
        unique_by=lambda e: e[0],
    ),
    # save_file orders several metadata keys by hash, so at most one (what every caller passes)
    metadata=st.one_of(st.none(), st.dictionaries(st.text("abc", min_size=1, max_size=3), st.text(max_size=4), max_size=1)),
    seed=st.integers(0, 2**16),
)
def test_header_layout_equals_save_file_on_random_tensors(tmp_path_factory, entries, metadata, seed):
    gen = torch.Generator().manual_seed(seed)
    tensors = {name: _random_tensor(gen, row.torch, tuple(shape)) for name, row, shape in entries}
    if not tensors and metadata == {}:
        metadata = None  # safetensors 0.8 writes a malformed header for this one case
    folder = tmp_path_factory.mktemp("h")
    save_file(tensors, str(folder / "ref.safetensors"), metadata=metadata)
    raw, _ = header_bytes([PlannedTensor(k, tuple(v.shape), v.dtype) for k, v in tensors.items()], metadata)
    ref = (folder / "ref.safetensors").read_bytes()
    assert raw == ref[: len(raw)]
    save_safetensors(tensors, folder / "ours.safetensors", metadata=metadata)
    assert (folder / "ours.safetensors").read_bytes() == ref


def _make(folder: Path, tensors: dict, **options) -> dict[str, str]:
    writer = ShardedWriter(folder, **options)
    for name, t in tensors.items():
        writer.write(name, t)
    return writer.finish()


def test_sharded_spool_writer_matches_save_file_per_shard(tmp_path):
    gen = torch.Generator().manual_seed(1)
    tensors = {f"w{i}": _random_tensor(gen, [torch.float32, torch.bfloat16, torch.int8][i % 3], (16, 8)) for i in range(9)}
    location = _make(tmp_path, tensors, max_shard_bytes=1200, metadata={"format": "pt"})
    files = sorted(set(location.values()))
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)] and len(files) > 2
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index == {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())}, "weight_map": dict(sorted(location.items()))}
    for shard in files:
        names = [n for n, f in location.items() if f == shard]
        save_file({n: tensors[n] for n in names}, str(tmp_path / "ref.st"), metadata={"format": "pt"})
        assert (tmp_path / shard).read_bytes() == (tmp_path / "ref.st").read_bytes(), shard
    assert not list(tmp_path.glob(".*"))  # spool and temporaries are gone


def test_planned_writer_streams_in_plan_order_with_the_given_header_order(tmp_path):
    gen = torch.Generator().manual_seed(2)
    tensors = {"z": _random_tensor(gen, torch.int8, (5,)), "a": _random_tensor(gen, torch.float32, (2, 3)), "m": torch.zeros(0)}
    plan = [PlannedTensor(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    _make(tmp_path, tensors, plan=plan, layout="plan", metadata={"format": "pt", "merged_by": "x"})
    data = (tmp_path / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    # hand-built: plan order, metadata as given, offsets back to back
    expected = (
        '{"__metadata__":{"format":"pt","merged_by":"x"},'
        '"z":{"dtype":"I8","shape":[5],"data_offsets":[0,5]},'
        '"a":{"dtype":"F32","shape":[2,3],"data_offsets":[5,29]},'
        '"m":{"dtype":"F32","shape":[0],"data_offsets":[29,29]}}'
    )
    assert data[8 : 8 + n].decode() == expected + " " * (-len(expected) % 8)
    assert data[8 + n :] == _raw(tensors["z"]) + _raw(tensors["a"])
    loaded = load_file(str(tmp_path / "model.safetensors"))
    assert all(_same(loaded[k], v) for k, v in tensors.items())
    # the same plan in the safetensors layout equals save_file
    _make(tmp_path / "st", tensors, plan=plan, metadata={"format": "pt"})
    save_file(tensors, str(tmp_path / "ref.st"), metadata={"format": "pt"})
    assert (tmp_path / "st" / "model.safetensors").read_bytes() == (tmp_path / "ref.st").read_bytes()


def test_planned_writer_shards_and_index_follow_the_plan(tmp_path):
    tensors = {f"l{i}": torch.full((10,), float(i)) for i in range(5)}
    plan = [PlannedTensor(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    writer = ShardedWriter(tmp_path, 80, plan=plan, layout="plan")
    assert writer.files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]  # 40 bytes each, two per shard
    for k, v in tensors.items():
        writer.write(k, v)
    location = writer.finish()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert list(index["weight_map"]) == list(tensors) and index["weight_map"] == location
    assert location["l4"] == "model-00003-of-00003.safetensors"
    assert torch.equal(load_file(str(tmp_path / location["l3"]))["l3"], tensors["l3"])


@pytest.mark.parametrize("planned", [False, True])
def test_a_failure_midway_leaves_no_partial_output(tmp_path, planned):
    tensors = {"a": torch.ones(50), "b": torch.ones(50), "c": torch.ones(50)}  # 200 bytes each
    plan = [PlannedTensor(k, tuple(v.shape), v.dtype) for k, v in tensors.items()] if planned else None

    def produce(name: str) -> torch.Tensor:
        if name == "c":
            raise RuntimeError("the tensor failed to compute")
        return tensors[name]

    with pytest.raises(RuntimeError, match="failed to compute"):
        with ShardedWriter(tmp_path, 500, plan=plan) as writer:  # "a" and "b" fill one shard, "c" starts a second
            for name in tensors:
                writer.write(name, produce(name))
            writer.finish()
    assert list(tmp_path.iterdir()) == []
    # an error inside the writer (wrong tensor for the plan / unsupported dtype) cleans up too
    writer = ShardedWriter(tmp_path, 500, plan=plan)
    writer.write("a", tensors["a"])
    with pytest.raises(SparsemergeError, match="expected b" if planned else "written twice"):
        writer.write("a", tensors["a"])
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SparsemergeError, match="internal: the writer is already finished"):
        writer.finish()
    # a writer dropped without finish() leaves nothing either
    writer = ShardedWriter(tmp_path, 500, plan=plan)
    writer.write("a", tensors["a"])
    del writer
    assert list(tmp_path.iterdir()) == []


def test_unplanned_refuses_unknown_dtype_and_keeps_groups_together(tmp_path):
    writer = ShardedWriter(tmp_path, 16)
    with pytest.raises(SparsemergeError, match="cannot write tensor 'x' of dtype complex128"):
        writer.write("x", torch.zeros(2, dtype=torch.complex128))
    assert list(tmp_path.iterdir()) == []
    writer = ShardedWriter(tmp_path, 16, prefix="packed", single_name=None, index=False)
    writer.write_group({"w:values": torch.ones(4), "w:metadata": torch.ones(4, dtype=torch.uint8)})  # 20 bytes > 16: one shard
    writer.write_group({"v:values": torch.ones(2)})
    location = writer.finish()
    assert location == {"w:values": "packed-00001-of-00002.safetensors", "w:metadata": "packed-00001-of-00002.safetensors",
                        "v:values": "packed-00002-of-00002.safetensors"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packed-00001-of-00002.safetensors", "packed-00002-of-00002.safetensors"]
    empty = ShardedWriter(tmp_path / "empty", 16, metadata={"format": "pt"})
    assert empty.finish() == {}
    assert load_file(str(tmp_path / "empty" / "model.safetensors")) == {}


def test_existing_output_is_refused_without_overwrite(tmp_path):
    first = {"a": torch.arange(4.0)}
    save_safetensors(first, tmp_path / "x.safetensors")
    with pytest.raises(SparsemergeError, match="already exists.*overwrite"):
        save_safetensors({"a": torch.zeros(4)}, tmp_path / "x.safetensors")
    assert torch.equal(load_file(str(tmp_path / "x.safetensors"))["a"], first["a"])  # untouched
    save_safetensors({"a": torch.zeros(4)}, tmp_path / "x.safetensors", overwrite=True)
    assert torch.equal(load_file(str(tmp_path / "x.safetensors"))["a"], torch.zeros(4))
    # the sharded writer: refused before any work when it knows its names (a plan), else at finish
    _make(tmp_path / "f", first)
    plan = [PlannedTensor("a", (4,), torch.float32)]
    with pytest.raises(SparsemergeError, match="model.safetensors' already exists"):
        ShardedWriter(tmp_path / "f", plan=plan)
    writer = ShardedWriter(tmp_path / "f")
    writer.write("a", torch.zeros(4))
    with pytest.raises(SparsemergeError, match="already exists"):
        writer.finish()
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == ["model.safetensors"]
    assert torch.equal(load_file(str(tmp_path / "f" / "model.safetensors"))["a"], first["a"])


def _corrupt(tmp_path: Path, name: str, edit) -> Path:
    save_file({"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3, dtype=torch.int8)}, str(tmp_path / "ok.safetensors"))
    data = bytearray((tmp_path / "ok.safetensors").read_bytes())
    path = tmp_path / name
    path.write_bytes(bytes(edit(data)))
    return path


def _with_header(text: str, data: bytes = b"") -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    "edit, reason",
    [
        (lambda d: d[: len(d) - 5], "data section holds"),  # truncated data
        (lambda d: d[:30], "header length"),  # truncated header
        (lambda d: d[:4], "shorter than the 8-byte"),
        (lambda d: _with_header("{not json"), "not valid UTF-8 JSON"),
        (lambda d: _with_header("[1, 2]"), "not a JSON object"),
        (lambda d: _with_header('{"a":{"dtype":"F13","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4), "entry 'a' is malformed"),
        (lambda d: _with_header('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}', b"\0" * 4), "needs 8 bytes, offsets span 4"),
        (lambda d: _with_header('{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', b"\0" * 8), "starts at 4, expected 0"),
        (lambda d: _with_header('{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}', b"\0" * 4), "invalid shape or offsets"),
        (lambda d: _with_header('{"__metadata__":{"k":1}}'), "string-to-string"),
        (lambda d: d + b"\0" * 8, "data section holds"),  # trailing bytes
    ],
)
def test_truncated_or_corrupt_files_give_a_clear_error(tmp_path, edit, reason):
    path = _corrupt(tmp_path, "bad.safetensors", edit)
    with pytest.raises(SparsemergeError, match=rf"bad\.safetensors' is not a readable safetensors file \(truncated or corrupt\?\): .*{reason}"):
        SafetensorsFile(path)
    reader = ShardReader(tmp_path, {"bad.safetensors": ["a", "b"]})
    with pytest.raises(SparsemergeError, match=r"shard 'bad.safetensors' is unreadable - truncated or corrupt\?.*it holds a, b"):
        reader.get("bad.safetensors", "a", "tensor 'a'")


def test_a_file_truncated_after_open_fails_on_read(tmp_path):
    path = _corrupt(tmp_path, "x.safetensors", lambda d: d)
    f = SafetensorsFile(path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(SparsemergeError, match="ends early"):
        f.get("a")
    f.close()


def test_tensor_source_reads_with_the_io_reader(tmp_path):
    from sparsemerge.io import open_tensor_source

    tensors = _every_dtype(3)
    save_file(tensors, str(tmp_path / "m.safetensors"))
    with open_tensor_source(tmp_path / "m.safetensors") as source:
        assert source.names() == sorted(tensors)
        for name, t in tensors.items():
            assert source.dtype(name) == t.dtype and source.shape(name) == tuple(t.shape)
            assert _same(source.get(name), t)
