"""Every form a linear layer's weight can take (layers/matmul.py) computes what F.linear computes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loraserve.layers.matmul import MatmulWeight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 64, 130])
@pytest.mark.parametrize("bias", [False, True])
def test_prepacked_forms_equal_f_linear(dtype, tokens, bias):
    torch.manual_seed(tokens)
    weight = torch.randn(200, 96, dtype=dtype)
    b = torch.randn(200, dtype=dtype) if bias else None
    x = torch.randn(tokens, 96, dtype=dtype)
    matmul = MatmulWeight(weight.clone())
    assert matmul.kind == ("mkl" if dtype == torch.float32 else "onednn")  # the CPU fast paths are in use
    torch.testing.assert_close(matmul(x, b), F.linear(x, weight, b), rtol=0, atol=0)
    assert matmul(x.view(1, tokens, 96), b).shape == (1, tokens, 200)


def test_onednn_form_holds_one_copy():
    matmul = MatmulWeight(torch.randn(64, 32, dtype=torch.bfloat16))
    assert matmul.dense is None and matmul.nbytes == 64 * 32 * 2
