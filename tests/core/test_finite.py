import pytest
import torch

from sparsemerge.finite import all_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1.0])
def test_all_finite_agrees_with_isfinite(dtype, value):
    for shape, where in (((7, 9), (6, 8)), ((1,), (0,)), ((3, 4, 5), (0, 0, 0))):
        t = torch.randn(shape).to(dtype)
        t[where] = value
        assert all_finite(t) == bool(torch.isfinite(t).all())


def test_all_finite_edge_cases():
    assert all_finite(torch.zeros(0)) and all_finite(torch.arange(5)) and all_finite(torch.tensor(True))
    assert not all_finite(torch.tensor(float("nan")))
