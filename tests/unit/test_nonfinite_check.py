"""The non-finite guard's gradient check (guards._all_finite): finite gradients pass, whatever
their dtype and size; one inf or NaN anywhere fails."""

from __future__ import annotations

import pytest
import torch

from sftlab.train.guards import _all_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_large_finite_gradients_pass(dtype):
    # each value fits every dtype; the fp16 tensor's norm (~94,900) does not fit fp16
    grads = [torch.full((100_000,), 300.0, dtype=dtype), torch.ones(7, dtype=torch.float32)]
    assert bool(_all_finite(grads))


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_one_bad_value_fails(dtype, bad):
    grads = [torch.ones(5, dtype=torch.float32), torch.ones(1000, dtype=dtype)]
    grads[1][123] = bad
    assert not bool(_all_finite(grads))
