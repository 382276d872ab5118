"""Fuzz tests of every reader of untrusted files (issue 17, "Hardening"): the safetensors
header, the shard index, the packed manifest, GGUF and the YAML recipes.

Each property feeds mutated inputs (tests/io/fuzz_*.py draw them) through the project's entry
points; an example passes when the call succeeds or raises SparsemergeError, and fails on any
other exception, a hang (over ``TIME_LIMIT_S``) or a huge allocation (the address space is
capped while it runs). Crashes found in modules another change owns are tolerated by name
(``fuzz_testlib.KNOWN_UNFIXED``) and tracked as strict xfails in test_io_fuzz_regressions.py.
The 1,010 examples keep the file at ~30 s on two cores, derandomized so CI sees the same
examples every time; ``benchmarks/fuzz_readers.py --minutes N`` runs the same properties for
longer with fresh seeds.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from fuzz_readers_files import INDEX, PACKED, SAFETENSORS
from fuzz_readers_gguf import GGUF
from fuzz_readers_yaml import YAML
from fuzz_testlib import Reader, run_example


def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


def _ctx(reader: Reader, tmp_path_factory: pytest.TempPathFactory):
    return reader.setup(tmp_path_factory.mktemp(f"fuzz-{reader.name}"))


@pytest.fixture(scope="module")
def safetensors_ctx(tmp_path_factory):
    return _ctx(SAFETENSORS, tmp_path_factory)


@pytest.fixture(scope="module")
def index_ctx(tmp_path_factory):
    return _ctx(INDEX, tmp_path_factory)


@pytest.fixture(scope="module")
def packed_ctx(tmp_path_factory):
    return _ctx(PACKED, tmp_path_factory)


@fuzz_settings(300)
@given(example=SAFETENSORS.strategy)
def test_fuzz_safetensors_header(safetensors_ctx, example):
    """Length prefix, JSON header (dtypes, shapes, offsets, metadata), UTF-8 and data section."""
    run_example(SAFETENSORS, safetensors_ctx, example)


@fuzz_settings(150)
@given(example=INDEX.strategy)
def test_fuzz_shard_index_and_source(index_ctx, example):
    """model.safetensors.index.json and config.json of a Hugging Face folder."""
    run_example(INDEX, index_ctx, example)


@fuzz_settings(200)
@given(example=PACKED.strategy)
def test_fuzz_packed_manifest(packed_ctx, example):
    """sparsemerge_packed.json of every format and codec (sealed again after the edit or not)."""
    run_example(PACKED, packed_ctx, example)


@pytest.fixture(scope="module")
def yaml_ctx(tmp_path_factory):
    return _ctx(YAML, tmp_path_factory)


@fuzz_settings(300)
@given(example=YAML.strategy)
def test_fuzz_yaml_recipes(yaml_ctx, example):
    """Merge, MoE, training and prune recipes: edited trees, edited text, loader-breaking YAML."""
    run_example(YAML, yaml_ctx, example)


@pytest.fixture(scope="module")
def gguf_ctx(tmp_path_factory):
    return _ctx(GGUF, tmp_path_factory)


@fuzz_settings(60)
@given(example=GGUF.strategy)
def test_fuzz_gguf(gguf_ctx, example):
    """GGUF metadata, tensor table and bytes, through open_tensor_source (transformers behind)."""
    run_example(GGUF, gguf_ctx, example)
