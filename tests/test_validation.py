"""Framework-independent helpers of the validation pass."""

from __future__ import annotations

import pytest
import torch

from inrun_megatron.validation import all_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_all_finite_finds_any_inf_or_nan_and_accepts_sums_that_overflow(dtype):
    big = torch.finfo(dtype).max
    tensors = [torch.randn(3, 5).to(dtype), torch.randn(7).to(dtype)]
    assert all_finite(tensors) and all_finite([])
    for bad in (float("inf"), float("-inf"), float("nan")):
        broken = [t.clone() for t in tensors]
        broken[1][4] = bad
        assert not all_finite(broken)
    # every element finite, but their sum overflows: still finite
    assert all_finite([torch.full((4,), big, dtype=dtype), torch.full((2,), -big, dtype=dtype)])
    # an inf and a -inf, whose sum is NaN, in different tensors
    assert not all_finite([torch.tensor([float("inf")], dtype=dtype), torch.tensor([float("-inf")], dtype=dtype)])
