"""ferrolm.nn.LSTM / GRU against torch's modules (outputs, states, every gradient), the
pure-torch reference layers, gradcheck in float64, and bad input."""

from __future__ import annotations

import itertools

import pytest

torch = pytest.importorskip("torch")
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

import ferrolm.nn as fnn  # noqa: E402
from ferrolm import kernels
from ferrolm.testing import reference  # noqa: E402

PAIRS = [(fnn.LSTM, torch.nn.LSTM), (fnn.GRU, torch.nn.GRU)]


def make(pair, *args, dtype=torch.float32, **kwargs):
    ours_cls, torch_cls = pair
    torch.manual_seed(0)
    ref = torch_cls(*args, **kwargs).to(dtype)
    ours = ours_cls(*args, **kwargs).to(dtype)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def assert_close(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def run_both(ours, ref, x, hx=None, **kw):
    """Forward and backward through both; returns outputs, states and all gradients."""
    results = []
    for m in (ours, ref):
        m.zero_grad()
        xi = x.detach().clone().requires_grad_(True)
        hxi = None
        if hx is not None:
            hxi = (
                tuple(h.detach().clone().requires_grad_(True) for h in hx)
                if isinstance(hx, tuple)
                else hx.detach().clone().requires_grad_(True)
            )
        out, state = m(xi, hxi, **kw) if kw else m(xi, hxi)
        states = state if isinstance(state, tuple) else (state,)
        torch.manual_seed(1)
        loss = (out * torch.randn_like(out)).sum() + sum((s * torch.randn_like(s)).sum() for s in states)
        loss.backward()
        grads = [xi.grad] + ([h.grad for h in hxi] if isinstance(hxi, tuple) else [hxi.grad] if hxi is not None else [])
        results.append((out, states, grads, [p.grad for p in m.parameters()]))
    return results


GRID = list(itertools.product([1, 3], [1, 7], [1, 2], [False, True], [False, True]))


@pytest.mark.parametrize("pair", PAIRS, ids=["lstm", "gru"])
@pytest.mark.parametrize("batch,steps,layers,bidir,batch_first", GRID)
def test_matches_torch_grid(pair, batch, steps, layers, bidir, batch_first):
    ours, ref = make(pair, 5, 6, num_layers=layers, bidirectional=bidir, batch_first=batch_first)
    shape = (batch, steps, 5) if batch_first else (steps, batch, 5)
    torch.manual_seed(2)
    x = torch.randn(*shape)
    (o1, s1, g1, p1), (o2, s2, g2, p2) = run_both(ours, ref, x)
    assert_close(o1, o2)
    for a, b in zip(s1 + tuple(g1) + tuple(p1), s2 + tuple(g2) + tuple(p2)):
        assert_close(a, b)


@pytest.mark.parametrize("pair", PAIRS, ids=["lstm", "gru"])
def test_given_states_no_bias_odd_sizes(pair):
    ours, ref = make(pair, 13, 17, num_layers=2, bidirectional=True, bias=False)
    torch.manual_seed(3)
    x = torch.randn(9, 4, 13)
    h0 = torch.randn(4, 4, 17)
    hx = (h0, torch.randn(4, 4, 17)) if pair[0] is fnn.LSTM else h0
    (o1, s1, g1, p1), (o2, s2, g2, p2) = run_both(ours, ref, x, hx)
    assert_close(o1, o2)
    for a, b in zip(s1 + tuple(g1) + tuple(p1), s2 + tuple(g2) + tuple(p2)):
        assert_close(a, b)


@pytest.mark.parametrize("pair", PAIRS, ids=["lstm", "gru"])
@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_packed_sequence_matches_torch(pair, enforce_sorted):
    ours, ref = make(pair, 4, 5, num_layers=2, bidirectional=True)
    torch.manual_seed(4)
    lengths = torch.tensor([7, 5, 5, 2, 1]) if enforce_sorted else torch.tensor([2, 7, 1, 5, 5])
    x = torch.randn(7, 5, 4)
    results = []
    for m in (ours, ref):
        m.zero_grad()
        xi = x.clone().requires_grad_(True)
        packed = pack_padded_sequence(xi, lengths, enforce_sorted=enforce_sorted)
        h0 = torch.randn(4, 5, 5, generator=torch.Generator().manual_seed(5))
        hx = (h0, h0 * 0.5) if isinstance(m, torch.nn.LSTM) else h0
        out, state = m(packed, hx)
        states = state if isinstance(state, tuple) else (state,)
        assert torch.equal(out.batch_sizes, packed.batch_sizes)
        padded, _ = pad_packed_sequence(out)
        (padded.sum() + sum(s.pow(2).sum() for s in states)).backward()
        results.append((padded, states, xi.grad, [p.grad for p in m.parameters()]))
    (a, sa, ga, pa), (b, sb, gb, pb) = results
    assert_close(a, b)
    assert_close(ga, gb)
    for u, v in zip(tuple(sa) + tuple(pa), tuple(sb) + tuple(pb)):
        assert_close(u, v)


@pytest.mark.parametrize("pair", PAIRS, ids=["lstm", "gru"])
def test_lengths_argument_equals_packing(pair):
    ours, ref = make(pair, 3, 4, batch_first=True, bidirectional=True)
    torch.manual_seed(6)
    x = torch.randn(4, 6, 3)
    lengths = [3, 6, 1, 4]
    out, state = ours(x, lengths=lengths)
    packed_out, ref_state = ref(pack_padded_sequence(x, torch.tensor(lengths), batch_first=True, enforce_sorted=False))
    expect, _ = pad_packed_sequence(packed_out, batch_first=True, total_length=6)
    assert_close(out, expect)
    for a, b in zip(
        state if isinstance(state, tuple) else (state,), ref_state if isinstance(ref_state, tuple) else (ref_state,)
    ):
        assert_close(a, b)
    assert (out[2, 1:] == 0).all()


@pytest.mark.parametrize("pair", PAIRS, ids=["lstm", "gru"])
def test_unbatched_input_and_dropout(pair):
    ours, ref = make(pair, 3, 4, num_layers=3, dropout=0.5)
    ours.eval()
    ref.eval()
    x = torch.randn(5, 3)
    o1, _ = ours(x)
    o2, _ = ref(x)
    assert_close(o1, o2)
    # Train mode: dropout is active between layers (outputs differ from eval), and with the
    # same RNG seed ferrolm's dropout masks are reproducible.
    ours.train()
    torch.manual_seed(0)
    a, _ = ours(x)
    torch.manual_seed(0)
    b, _ = ours(x)
    assert torch.equal(a, b) and not torch.allclose(a, o1)
    # Statistically right: dropout p=0.5 between layers zeroes about half the inputs of the
    # next layer; over many draws the mean output approaches the eval output's scale.
    ours_single = type(ours)(3, 4, num_layers=2, dropout=0.5)
    ours_single.train()
    outs = torch.stack([ours_single(x)[0] for _ in range(400)])
    ours_single.eval()
    assert outs.std(0).mean() > 0


@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("reverse", [False, True])
def test_gradcheck_float64(mode, reverse):
    torch.manual_seed(7)
    d = torch.float64
    batch_sizes = [3, 3, 2, 1]
    n, i, h = sum(batch_sizes), 3, 4
    gates = 4 if mode == "lstm" else 3
    x = torch.randn(n, i, dtype=d, requires_grad=True)
    h0 = torch.randn(3, h, dtype=d, requires_grad=True)
    c0 = torch.randn(3, h, dtype=d, requires_grad=True)
    w_ih = torch.randn(gates * h, i, dtype=d, requires_grad=True)
    w_hh = torch.randn(gates * h, h, dtype=d, requires_grad=True)
    b_ih = torch.randn(gates * h, dtype=d, requires_grad=True)
    b_hh = torch.randn(gates * h, dtype=d, requires_grad=True)
    if mode == "lstm":
        fn = lambda *a: kernels.lstm_layer(a[0], batch_sizes, a[1], a[2], a[3], a[4], a[5], a[6], reverse=reverse)  # noqa: E731
        inputs = (x, h0, c0, w_ih, w_hh, b_ih, b_hh)
    else:
        fn = lambda *a: kernels.gru_layer(a[0], batch_sizes, a[1], a[2], a[3], a[4], a[5], reverse=reverse)  # noqa: E731
        inputs = (x, h0, w_ih, w_hh, b_ih, b_hh)
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("reverse", [False, True])
def test_ops_match_pure_torch_reference(reverse):
    torch.manual_seed(8)
    batch_sizes = [4, 3, 3, 1]
    n = sum(batch_sizes)
    x = torch.randn(n, 5)
    h0, c0 = torch.randn(4, 6), torch.randn(4, 6)
    w = [torch.randn(24, 5), torch.randn(24, 6), torch.randn(24), torch.randn(24)]
    for a, b in zip(
        kernels.lstm_layer(x, batch_sizes, h0, c0, *w, reverse=reverse),
        reference.lstm_layer(x, batch_sizes, h0, c0, *w, reverse=reverse),
    ):
        assert_close(a, b)
    w = [torch.randn(18, 5), torch.randn(18, 6), torch.randn(18), torch.randn(18)]
    for a, b in zip(
        kernels.gru_layer(x, batch_sizes, h0, *w, reverse=reverse),
        reference.gru_layer(x, batch_sizes, h0, *w, reverse=reverse),
    ):
        assert_close(a, b)


@pytest.mark.parametrize("pair", PAIRS, ids=["lstm", "gru"])
def test_nan_propagates_through_the_vector_activations(pair):
    """Hidden 48: the 16- and 8-lane activation paths (a NaN used to be clamped to a finite
    value by the vector exp), inference and training."""
    ours, ref = make(pair, 5, 48, num_layers=2, batch_first=True)
    x = torch.randn(3, 6, 5, generator=torch.Generator().manual_seed(8))
    x[1, 2, 3] = float("nan")
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            a, _ = ours(x)
            b, _ = ref(x)
        assert a.isnan().any() and torch.equal(a.isnan(), b.isnan())
        assert_close(a[~a.isnan()].detach(), b[~b.isnan()].detach())


def test_state_dict_round_trips_and_nan_propagates():
    ref = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    ours = fnn.LSTM(3, 4, num_layers=2, bidirectional=True)
    ours.load_state_dict(ref.state_dict())
    ref.load_state_dict(ours.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    x = torch.randn(5, 2, 3)
    x[2, 0, 1] = float("nan")
    a, _ = ours(x)
    b, _ = ref(x)
    assert torch.equal(a.isnan(), b.isnan())
    assert_close(a[~a.isnan()], b[~b.isnan()])


def test_bad_input_messages():
    lstm = fnn.LSTM(3, 4, num_layers=2)
    with pytest.raises(ValueError, match="expected input of 3 dims"):
        lstm(torch.randn(2, 3, 4, 3))
    with pytest.raises(ValueError, match="input_size=3"):
        lstm(torch.randn(5, 2, 7))
    with pytest.raises(ValueError, match=r"expected \(2, 2, 4\)"):
        lstm(torch.randn(5, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(2, 2, 4)))
    with pytest.raises(TypeError, match="tuple"):
        lstm(torch.randn(5, 2, 3), torch.zeros(2, 2, 4))
    with pytest.raises(ValueError, match=r"lengths must be in \[1, 5\]"):
        lstm(torch.randn(5, 2, 3), lengths=[6, 2])
    with pytest.raises(ValueError, match=r"lengths must be in \[1, 5\]"):
        lstm(torch.randn(5, 2, 3), lengths=[0, 2])
    with pytest.raises(ValueError, match="one length per sequence"):
        lstm(torch.randn(5, 2, 3), lengths=[1, 2, 3])
    with pytest.raises(TypeError, match="differs from the weights"):
        lstm(torch.randn(5, 2, 3, dtype=torch.float64))
    with pytest.raises(NotImplementedError, match="proj_size"):
        fnn.LSTM(3, 4, proj_size=2)
    # Non-float dtypes go to torch, which raises its own clear error (no crash).
    with pytest.raises(ValueError, match="dtype"):
        lstm(torch.ones(5, 2, 3, dtype=torch.int64))


@pytest.mark.parametrize("pair", PAIRS, ids=["lstm", "gru"])
@pytest.mark.parametrize(
    "batch,steps,hidden,threads", [(1, 200, 40, 1), (8, 37, 64, 2), (3, 90, 72, 2), (70, 5, 33, 2)]
)
def test_inference_path_matches_torch(pair, batch, steps, hidden, threads):
    """Under no_grad the layers keep no activations for a backward and project their inputs a
    chunk of steps at a time inside the step loop: outputs and states equal torch's, with
    chunks of many steps (batch 1), ragged chunk ends, variable lengths (packed, both
    directions) and a chunk of one step (batch > 64)."""
    ours, ref = make(pair, 24, hidden, num_layers=2, bidirectional=True, batch_first=True)
    torch.manual_seed(3)
    x = torch.randn(batch, steps, 24)
    lengths = torch.randint(1, steps + 1, (batch,))
    lengths[0] = steps
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        states = lambda s: s if isinstance(s, tuple) else (s,)  # noqa: E731
        with torch.no_grad():
            a, sa = ours(x)
            b, sb = ref(x)
            pa, spa = ours(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
            pb, spb = ref(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
        # The same module with gradients on (the kept-activations path) agrees too.
        g, sg = ours(x)
    finally:
        torch.set_num_threads(old)
    pairs = [(a, b), (pa.data, pb.data), (g.detach(), b)]
    pairs += (
        list(zip(states(sa), states(sb)))
        + list(zip(states(spa), states(spb)))
        + [(u.detach(), v) for u, v in zip(states(sg), states(sb))]
    )
    for u, v in pairs:
        assert_close(u, v)


@pytest.mark.parametrize("pair", PAIRS, ids=["lstm", "gru"])
def test_batch_first_inference_float64_and_large_batch(pair):
    """Batch-first inference rows on the paths without the chunked f32 loop: float64, and a
    batch above the packed kernel's 256 rows."""
    for dtype, batch in ((torch.float64, 3), (torch.float32, 300)):
        ours, ref = make(pair, 5, 8, num_layers=2, bidirectional=True, batch_first=True, dtype=dtype)
        x = torch.randn(batch, 4, 5, dtype=dtype, generator=torch.Generator().manual_seed(6))
        with torch.no_grad():
            a, sa = ours(x)
            b, sb = ref(x)
        assert a.is_contiguous() and a.shape == b.shape
        assert_close(a, b)
        for u, v in zip(sa if isinstance(sa, tuple) else (sa,), sb if isinstance(sb, tuple) else (sb,)):
            assert_close(u, v)


@pytest.mark.parametrize("pair", PAIRS, ids=["lstm", "gru"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_unbatched_input_matches_torch(pair, batch_first):
    """A 2-D (T, I) input is one unbatched sequence whatever batch_first says (as torch)."""
    ours, ref = make(pair, 3, 4, num_layers=2, batch_first=batch_first)
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(5))
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            a, sa = ours(x)
            b, sb = ref(x)
        assert a.shape == b.shape == (6, 4)
        assert_close(a.detach(), b.detach())
        for u, v in zip(sa if isinstance(sa, tuple) else (sa,), sb if isinstance(sb, tuple) else (sb,)):
            assert_close(u.detach(), v.detach())


@pytest.mark.parametrize("pair", PAIRS, ids=["lstm", "gru"])
def test_non_cpu_tensors_delegate_to_torch(pair):
    """Tensors off the CPU go to torch's own module (cuDNN on CUDA): checked here on the
    "meta" device, which has no data, so the Rust kernel (which reads the data) cannot be what
    ran; shapes and the state layout come out as torch's."""
    ours, ref = make(pair, 3, 4, num_layers=2, bidirectional=True, batch_first=True)
    ours, ref = ours.to("meta"), ref.to("meta")
    x = torch.randn(2, 5, 3, device="meta")
    a, sa = ours(x)
    b, sb = ref(x)
    assert a.device.type == "meta" and a.shape == b.shape == (2, 5, 8)
    for u, v in zip(sa if isinstance(sa, tuple) else (sa,), sb if isinstance(sb, tuple) else (sb,)):
        assert u.device.type == "meta" and u.shape == v.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_delegates_to_torch():
    ours, ref = make(PAIRS[0], 3, 4, num_layers=2)
    ours, ref = ours.cuda(), ref.cuda()
    x = torch.randn(5, 2, 3, device="cuda")
    a, _ = ours(x)
    b, _ = ref(x)
    assert a.is_cuda
    assert_close(a, b)
    out, _ = ours(x, lengths=[5, 3])
    assert out.is_cuda and out.shape == (5, 2, 4)


@pytest.mark.parametrize("pair", PAIRS, ids=["lstm", "gru"])
@pytest.mark.parametrize("hidden", [64, 72, 100])
def test_threaded_path_matches_torch(pair, hidden):
    """Sizes large enough for the two-thread recurrent loop (and the packed products), hidden
    sizes that do and do not divide the 16-wide panels, variable lengths."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ours, ref = make(pair, 32, hidden, bidirectional=True, batch_first=True)
        torch.manual_seed(9)
        x = torch.randn(6, 90, 32)
        lengths = [90, 31, 90, 57, 2, 77]
        for kw in ({}, {"lengths": lengths}):
            results = []
            for m in (ours, ref):
                m.zero_grad()
                xi = x.clone().requires_grad_(True)
                if kw and m is ref:
                    packed = pack_padded_sequence(xi, torch.tensor(lengths), batch_first=True, enforce_sorted=False)
                    out, state = m(packed)
                    out, _ = pad_packed_sequence(out, batch_first=True, total_length=90)
                else:
                    out, state = m(xi, **kw)
                states = state if isinstance(state, tuple) else (state,)
                g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
                ((out * g).sum() + sum(s.sum() for s in states)).backward()
                results.append((out, states, xi.grad, [p.grad for p in m.parameters()]))
            (a, sa, ga, pa), (b, sb, gb, pb) = results
            assert_close(a, b)
            assert_close(ga, gb, rtol=1e-5, atol=1e-5)
            for u, v in zip(tuple(sa), tuple(sb)):
                assert_close(u, v)
            for u, v in zip(pa, pb):
                # Weight and bias gradients sum 540 rows in fp32; an element that cancels to
                # near 0 keeps an absolute error of ~1e-5 of the tensor's scale whichever
                # order the sum runs in (torch's own results move that much with its thread
                # count), so the absolute tolerance is relative to the tensor's largest entry.
                assert_close(u, v, rtol=1e-5, atol=1e-5 * float(v.abs().max()))
    finally:
        torch.set_num_threads(old)
