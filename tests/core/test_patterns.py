import pytest

from sparsemerge.errors import SparsemergeError
from sparsemerge.patterns import NM, Block, Unstructured, parse_pattern


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2:4", NM(2, 4)),
        (" 1:4 ", NM(1, 4)),
        ("16:32", NM(16, 32)),
        ("block16:0.5", Block(16, 16, 0.5)),
        ("block8x4:0.25", Block(8, 4, 0.25)),
        ("unstructured:0.6", Unstructured(0.6)),
        ("unstructured-global:0.6", Unstructured(0.6, "global")),
    ],
)
def test_parse(text, expected):
    assert parse_pattern(text) == expected
    assert parse_pattern(str(expected)) == expected  # str() round-trips


@pytest.mark.parametrize("text", ["4:4", "5:4", "0:4", "2:0", "-1:4", "2:4:8", "bogus", "block16:1.5", "unstructured:1", "unstructured:-0.1", ""])
def test_parse_rejects(text):
    with pytest.raises(SparsemergeError) as info:
        parse_pattern(text)
    assert str(info.value)  # says what was expected


def test_nm_properties():
    p = NM(2, 4)
    assert p.sparsity == 0.5 and p.density == 0.5
    assert p.index_bits == 3  # ceil(log2 C(4,2)) = ceil(log2 6), chapter 10.1.3
    assert NM(2, 8).index_bits == 5  # C(8,2) = 28
