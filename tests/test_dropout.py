"""ferrolm.kernels.dropout / ferrolm.nn.Dropout: the distribution and scaling of torch's dropout,
the backward through the same (regenerated) mask, reproducibility under torch.manual_seed."""

import math

import pytest

torch = pytest.importorskip("torch")

from ferrolm.kernels import dropout
from ferrolm.kernels.dropout import _Dropout  # noqa: E402
from ferrolm.nn import Dropout  # noqa: E402


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_keeps_one_minus_p_scaled(p, dtype):
    torch.manual_seed(0)
    x = torch.rand(1000, 1000, dtype=dtype) + 0.5  # no zeros of its own
    y = dropout(x, p)
    kept = y != 0
    n = x.numel()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(kept.double().mean().item() - (1 - p)) < 5 * sigma
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))
    # Uniform over positions: every block of rows keeps about the same share.
    per_block = kept.view(10, -1).double().mean(1)
    assert float((per_block - (1 - p)).abs().max()) < 5 * math.sqrt(p * (1 - p) / (n / 10))
    # Adjacent elements are independent (agree as often as two coins would).
    agree = (kept[:, 1:] == kept[:, :-1]).double().mean().item()
    assert abs(agree - (p * p + (1 - p) ** 2)) < 0.005


def test_backward_uses_the_forward_mask():
    torch.manual_seed(1)
    x = (torch.rand(300, 257) + 0.5).requires_grad_(True)
    y = dropout(x, 0.3)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g * (y != 0) / 0.7)


def test_gradcheck_float64_with_a_fixed_mask():
    x = torch.randn(17, 23, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: _Dropout.apply(t, 0.4, 12345), (x,))


def test_seeded_and_fresh_masks():
    x = torch.ones(4096)
    torch.manual_seed(5)
    a = dropout(x, 0.5)
    b = dropout(x, 0.5)
    torch.manual_seed(5)
    c = dropout(x, 0.5)
    assert torch.equal(a, c)
    assert not torch.equal(a, b)


def test_identity_cases_and_fallbacks():
    x = torch.randn(8, 8)
    assert dropout(x, 0.0) is x
    assert dropout(x, 0.7, training=False) is x
    assert bool((dropout(x, 1.0) == 0).all())
    h = x.to(torch.bfloat16)
    assert dropout(h, 0.5).dtype == torch.bfloat16  # torch's own path
    nc = torch.randn(8, 16)[:, ::2]
    y = dropout(nc, 0.5)
    assert y.shape == nc.shape and bool(((y == 0) | torch.isclose(y, nc * 2)).all())
    with pytest.raises(ValueError, match="between 0 and 1"):
        dropout(x, 1.5)


def test_module_is_a_torch_dropout():
    m = Dropout(0.25)
    assert isinstance(m, torch.nn.Dropout) and m.p == 0.25
    x = torch.rand(100, 100) + 1
    frac = (m(x) == 0).double().mean().item()
    assert 0.2 < frac < 0.3
    m.eval()
    assert torch.equal(m(x), x)
