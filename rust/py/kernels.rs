//! Bindings for the recurrent kernels: one call per layer direction, f32 or f64 numpy arrays
//! in (torch tensors arrive as zero-copy numpy views), numpy arrays out.

use numpy::{Element, IntoPyArray, PyArrayDescrMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::kernels::rnn::{self, Dims, Saved, Weights};
use crate::kernels::Float;
use crate::parallel;

type Out<'py> = Bound<'py, PyAny>;

/// Whether the calls' arrays are float64 (the kernels then run in f64; else f32, and the
/// per-array extraction reports a dtype mismatch).
fn is_f64(a: &Bound<'_, PyAny>) -> bool {
    a.cast::<numpy::PyUntypedArray>()
        .is_ok_and(|u| u.dtype().is_equiv_to(&numpy::dtype::<f64>(a.py())))
}

fn arr<'py, T: Element>(name: &str, a: &Bound<'py, PyAny>) -> PyResult<PyReadonlyArrayDyn<'py, T>> {
    let r: PyReadonlyArrayDyn<'py, T> = a.extract().map_err(|_| {
        PyTypeError::new_err(format!(
            "{name} must be a numpy array of {} (all tensors of one call share the input's dtype)",
            std::any::type_name::<T>()
        ))
    })?;
    if !r.is_c_contiguous() {
        return Err(PyValueError::new_err(format!("{name} must be C-contiguous")));
    }
    Ok(r)
}

fn opt<'py, T: Element>(
    name: &str,
    a: Option<&Bound<'py, PyAny>>,
) -> PyResult<Option<PyReadonlyArrayDyn<'py, T>>> {
    a.filter(|a| !a.is_none()).map(|a| arr::<T>(name, a)).transpose()
}

fn sl<'a, T: Element>(a: &'a PyReadonlyArrayDyn<'_, T>) -> &'a [T] {
    a.as_slice().expect("checked contiguous")
}

fn out<'py, T: Element>(py: Python<'py>, v: Vec<T>, shape: &[usize]) -> PyResult<Out<'py>> {
    let a = numpy::ndarray::ArrayD::from_shape_vec(shape.to_vec(), v)
        .map_err(|e| PyValueError::new_err(format!("internal shape error: {e}")))?;
    Ok(a.into_pyarray(py).into_any())
}

struct Args<'py, T: Element> {
    x: PyReadonlyArrayDyn<'py, T>,
    h0: PyReadonlyArrayDyn<'py, T>,
    c0: Option<PyReadonlyArrayDyn<'py, T>>,
    w_ih: PyReadonlyArrayDyn<'py, T>,
    w_hh: PyReadonlyArrayDyn<'py, T>,
    b_ih: Option<PyReadonlyArrayDyn<'py, T>>,
    b_hh: Option<PyReadonlyArrayDyn<'py, T>>,
    dims: Dims,
}

// Pending: these arguments go into an options struct (listed as undone in the refactor).
#[allow(clippy::too_many_arguments)]
fn args<'py, T: Element>(
    lstm: bool,
    x: &Bound<'py, PyAny>,
    h0: &Bound<'py, PyAny>,
    c0: Option<&Bound<'py, PyAny>>,
    w_ih: &Bound<'py, PyAny>,
    w_hh: &Bound<'py, PyAny>,
    b_ih: Option<&Bound<'py, PyAny>>,
    b_hh: Option<&Bound<'py, PyAny>>,
) -> PyResult<Args<'py, T>> {
    let x = arr::<T>("input", x)?;
    let h0 = arr::<T>("h0", h0)?;
    let c0 = if lstm {
        Some(arr::<T>("c0", c0.ok_or_else(|| PyValueError::new_err("LSTM needs c0"))?)?)
    } else {
        None
    };
    let w_ih = arr::<T>("weight_ih", w_ih)?;
    let w_hh = arr::<T>("weight_hh", w_hh)?;
    let (xs, hs) = (x.shape(), w_hh.shape());
    if xs.len() != 2 || hs.len() != 2 {
        return Err(PyValueError::new_err(
            "input must be (N, input_size) and weight_hh (gates*H, H)",
        ));
    }
    let dims = Dims { input: xs[1], hidden: hs[1] };
    Ok(Args {
        x,
        h0,
        c0,
        w_ih,
        w_hh,
        b_ih: opt("bias_ih", b_ih)?,
        b_hh: opt("bias_hh", b_hh)?,
        dims,
    })
}

/// Runs a recurrent or attention kernel: f32 on the calling thread (its thread team is torch's
/// OpenMP team when torch is loaded, see `kernels::team`; moving to a rayon worker first would
/// make libgomp start a second team for that thread), f64 (whose products use the `gemm` crate
/// on rayon) inside ferrolm's sized rayon pool.
fn run_kernel<T: 'static, R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() {
        f()
    } else {
        parallel::install(threads, f)
    }
}

fn weights<'a, T: Element>(a: &'a Args<'_, T>) -> Weights<'a, T> {
    Weights {
        w_ih: sl(&a.w_ih),
        w_hh: sl(&a.w_hh),
        b_ih: a.b_ih.as_ref().map(sl),
        b_hh: a.b_hh.as_ref().map(sl),
    }
}

// Pending: these arguments go into an options struct (listed as undone in the refactor).
#[allow(clippy::too_many_arguments)]
fn forward<'py, T: Float + Element>(
    py: Python<'py>,
    lstm: bool,
    x: &Bound<'py, PyAny>,
    batch_sizes: &[usize],
    reverse: bool,
    h0: &Bound<'py, PyAny>,
    c0: Option<&Bound<'py, PyAny>>,
    w: [&Bound<'py, PyAny>; 2],
    b: [Option<&Bound<'py, PyAny>>; 2],
    threads: usize,
    keep: bool,
    batch_first: bool,
) -> PyResult<Vec<Out<'py>>> {
    let a = args::<T>(lstm, x, h0, c0, w[0], w[1], b[0], b[1])?;
    let (h, bsz, n) = (a.dims.hidden, batch_sizes.first().copied().unwrap_or(0), a.x.shape()[0]);
    let wts = weights(&a);
    let (xs, h0s) = (sl(&a.x), sl(&a.h0));
    let dims = a.dims;
    if lstm {
        let c0s = sl(a.c0.as_ref().expect("lstm has c0"));
        let o = py.detach(|| {
            run_kernel::<T, _>(threads, || {
                rnn::lstm_forward(
                    xs,
                    batch_sizes,
                    reverse,
                    dims,
                    h0s,
                    c0s,
                    &wts,
                    threads,
                    keep,
                    batch_first,
                )
            })
        })?;
        let (gates, cs) = if keep {
            (out(py, o.gates, &[n, 4 * h])?, out(py, o.cs, &[n, h])?)
        } else {
            (py.None().into_bound(py), py.None().into_bound(py))
        };
        Ok(vec![
            out(py, o.y, &[n, h])?,
            out(py, o.h_n, &[bsz, h])?,
            out(py, o.c_n, &[bsz, h])?,
            gates,
            cs,
        ])
    } else {
        let o = py.detach(|| {
            run_kernel::<T, _>(threads, || {
                rnn::gru_forward(
                    xs,
                    batch_sizes,
                    reverse,
                    dims,
                    h0s,
                    &wts,
                    threads,
                    keep,
                    batch_first,
                )
            })
        })?;
        let (gates, hn) = if keep {
            (out(py, o.gates, &[n, 3 * h])?, out(py, o.hn, &[n, h])?)
        } else {
            (py.None().into_bound(py), py.None().into_bound(py))
        };
        Ok(vec![
            out(py, o.y, &[n, h])?,
            out(py, o.h_n, &[bsz, h])?,
            py.None().into_bound(py),
            gates,
            hn,
        ])
    }
}

/// One layer direction forward: returns [y, h_n, c_n (None for GRU), gates, cell_or_candidate].
/// With `keep` false (no backward will follow) the last two are None; with `batch_first`
/// (inference, one length) x is (B*T, I) in batch-first row order and y comes back so.
#[pyfunction]
#[pyo3(signature = (
    mode, x, batch_sizes, reverse, h0, c0, w_ih, w_hh, b_ih, b_hh, threads, keep=true,
    batch_first=false
))]
// One parameter per argument of the Python-visible `_core` signature.
#[allow(clippy::too_many_arguments)]
pub fn rnn_forward<'py>(
    py: Python<'py>,
    mode: &str,
    x: &Bound<'py, PyAny>,
    batch_sizes: Vec<usize>,
    reverse: bool,
    h0: &Bound<'py, PyAny>,
    c0: Option<&Bound<'py, PyAny>>,
    w_ih: &Bound<'py, PyAny>,
    w_hh: &Bound<'py, PyAny>,
    b_ih: Option<&Bound<'py, PyAny>>,
    b_hh: Option<&Bound<'py, PyAny>>,
    threads: usize,
    keep: bool,
    batch_first: bool,
) -> PyResult<Vec<Out<'py>>> {
    let lstm = parse_mode(mode)?;
    let threads = parallel::resolve_threads(Some(threads));
    if is_f64(x) {
        forward::<f64>(
            py,
            lstm,
            x,
            &batch_sizes,
            reverse,
            h0,
            c0,
            [w_ih, w_hh],
            [b_ih, b_hh],
            threads,
            keep,
            batch_first,
        )
    } else {
        forward::<f32>(
            py,
            lstm,
            x,
            &batch_sizes,
            reverse,
            h0,
            c0,
            [w_ih, w_hh],
            [b_ih, b_hh],
            threads,
            keep,
            batch_first,
        )
    }
}

fn parse_mode(mode: &str) -> PyResult<bool> {
    match mode {
        "lstm" => Ok(true),
        "gru" => Ok(false),
        other => Err(PyValueError::new_err(format!("mode must be 'lstm' or 'gru', got {other:?}"))),
    }
}

// Pending: these arguments go into an options struct (listed as undone in the refactor).
#[allow(clippy::too_many_arguments)]
fn backward<'py, T: Float + Element>(
    py: Python<'py>,
    lstm: bool,
    x: &Bound<'py, PyAny>,
    batch_sizes: &[usize],
    reverse: bool,
    h0: &Bound<'py, PyAny>,
    c0: Option<&Bound<'py, PyAny>>,
    w: [&Bound<'py, PyAny>; 2],
    b: [Option<&Bound<'py, PyAny>>; 2],
    saved: [&Bound<'py, PyAny>; 3],
    grads: [Option<&Bound<'py, PyAny>>; 3],
    threads: usize,
) -> PyResult<Vec<Out<'py>>> {
    let a = args::<T>(lstm, x, h0, c0, w[0], w[1], b[0], b[1])?;
    let (y, gates, cs) =
        (arr::<T>("y", saved[0])?, arr::<T>("gates", saved[1])?, arr::<T>("cs", saved[2])?);
    let (h, n) = (a.dims.hidden, a.x.shape()[0]);
    let bsz = batch_sizes.first().copied().unwrap_or(0);
    let dy = arr::<T>(
        "grad_output",
        grads[0].ok_or_else(|| PyValueError::new_err("grad_output missing"))?,
    )?;
    let dh_n =
        arr::<T>("grad_h_n", grads[1].ok_or_else(|| PyValueError::new_err("grad_h_n missing"))?)?;
    let dc_n = if lstm {
        Some(arr::<T>(
            "grad_c_n",
            grads[2].ok_or_else(|| PyValueError::new_err("grad_c_n missing"))?,
        )?)
    } else {
        None
    };
    let wts = weights(&a);
    let s = Saved { y: sl(&y), gates: sl(&gates), cs: sl(&cs) };
    let (xs, h0s, dys, dhs) = (sl(&a.x), sl(&a.h0), sl(&dy), sl(&dh_n));
    let c0s: &[T] = a.c0.as_ref().map(sl).unwrap_or(&[]);
    let dcs: &[T] = dc_n.as_ref().map(sl).unwrap_or(&[]);
    let dims = a.dims;
    let g = py.detach(|| {
        run_kernel::<T, _>(threads, || {
            if lstm {
                rnn::lstm_backward(
                    xs,
                    batch_sizes,
                    reverse,
                    dims,
                    h0s,
                    c0s,
                    &wts,
                    s,
                    dys,
                    dhs,
                    dcs,
                    threads,
                )
            } else {
                rnn::gru_backward(xs, batch_sizes, reverse, dims, h0s, &wts, s, dys, dhs, threads)
            }
        })
    })?;
    let dc0 = if lstm { out(py, g.dc0, &[bsz, h])? } else { py.None().into_bound(py) };
    let dgh = if lstm { py.None().into_bound(py) } else { out(py, g.dgh, &[n, g.ldg])? };
    Ok(vec![
        out(py, g.dgx, &[n, g.ldg])?,
        dgh,
        out(py, g.hprev, &[n, h])?,
        out(py, g.dh0, &[bsz, h])?,
        dc0,
    ])
}

/// One layer direction's backward through time: returns [dgx, dgh (None for LSTM: equal to
/// dgx), hprev, dh0, dc0 (None for GRU)], the gate gradients as (N, stride) arrays whose first
/// G*H columns are the gradients (rows padded off 1 KiB multiples), for the caller's GEMMs.
#[pyfunction]
#[pyo3(signature = (
    mode, x, batch_sizes, reverse, h0, c0, w_ih, w_hh, b_ih, b_hh, y, gates, cs, dy, dh_n, dc_n,
    threads
))]
// One parameter per argument of the Python-visible `_core` signature.
#[allow(clippy::too_many_arguments)]
pub fn rnn_backward<'py>(
    py: Python<'py>,
    mode: &str,
    x: &Bound<'py, PyAny>,
    batch_sizes: Vec<usize>,
    reverse: bool,
    h0: &Bound<'py, PyAny>,
    c0: Option<&Bound<'py, PyAny>>,
    w_ih: &Bound<'py, PyAny>,
    w_hh: &Bound<'py, PyAny>,
    b_ih: Option<&Bound<'py, PyAny>>,
    b_hh: Option<&Bound<'py, PyAny>>,
    y: &Bound<'py, PyAny>,
    gates: &Bound<'py, PyAny>,
    cs: &Bound<'py, PyAny>,
    dy: Option<&Bound<'py, PyAny>>,
    dh_n: Option<&Bound<'py, PyAny>>,
    dc_n: Option<&Bound<'py, PyAny>>,
    threads: usize,
) -> PyResult<Vec<Out<'py>>> {
    let lstm = parse_mode(mode)?;
    let threads = parallel::resolve_threads(Some(threads));
    let args = ([w_ih, w_hh], [b_ih, b_hh], [y, gates, cs], [dy, dh_n, dc_n]);
    if is_f64(x) {
        backward::<f64>(
            py,
            lstm,
            x,
            &batch_sizes,
            reverse,
            h0,
            c0,
            args.0,
            args.1,
            args.2,
            args.3,
            threads,
        )
    } else {
        backward::<f32>(
            py,
            lstm,
            x,
            &batch_sizes,
            reverse,
            h0,
            c0,
            args.0,
            args.1,
            args.2,
            args.3,
            threads,
        )
    }
}

fn attn_shape(q: &[usize], k: &[usize], v: &[usize]) -> PyResult<crate::kernels::attention::Shape> {
    if q.len() != 4 || k.len() != 4 || v.len() != 4 {
        return Err(PyValueError::new_err("q, k and v must be 4-D (batch, heads, time, head_dim)"));
    }
    Ok(crate::kernels::attention::Shape {
        b: q[0],
        hq: q[1],
        hk: k[1],
        tq: q[2],
        tk: k[2],
        d: q[3],
        dv: v[3],
    })
}

fn pad_mask<'py>(m: Option<&Bound<'py, PyAny>>) -> PyResult<Option<PyReadonlyArrayDyn<'py, bool>>> {
    opt::<bool>("key_padding_mask", m)
}

// Pending: these arguments go into an options struct (listed as undone in the refactor).
#[allow(clippy::too_many_arguments)]
fn attn_fwd<'py, T: Float + Element>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    causal: bool,
    mask: Option<&Bound<'py, PyAny>>,
    scale: f64,
    threads: usize,
) -> PyResult<Vec<Out<'py>>> {
    let (q, k, v) = (arr::<T>("q", q)?, arr::<T>("k", k)?, arr::<T>("v", v)?);
    let sh = attn_shape(q.shape(), k.shape(), v.shape())?;
    let m = pad_mask(mask)?;
    let (qs, ks, vs) = (sl(&q), sl(&k), sl(&v));
    let ms: Option<&[bool]> = m.as_ref().map(sl);
    let (o, lse) = py.detach(|| {
        run_kernel::<T, _>(threads, || {
            crate::kernels::attention::forward(
                qs,
                ks,
                vs,
                sh,
                causal,
                ms,
                T::from_f64(scale),
                threads,
            )
        })
    })?;
    Ok(vec![out(py, o, &[sh.b, sh.hq, sh.tq, sh.dv])?, out(py, lse, &[sh.b, sh.hq, sh.tq])?])
}

/// Attention forward: returns [o, lse].
#[pyfunction]
#[pyo3(signature = (q, k, v, causal, key_padding_mask, scale, threads))]
// One parameter per argument of the Python-visible `_core` signature.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    causal: bool,
    key_padding_mask: Option<&Bound<'py, PyAny>>,
    scale: f64,
    threads: usize,
) -> PyResult<Vec<Out<'py>>> {
    let threads = parallel::resolve_threads(Some(threads));
    if is_f64(q) {
        attn_fwd::<f64>(py, q, k, v, causal, key_padding_mask, scale, threads)
    } else {
        attn_fwd::<f32>(py, q, k, v, causal, key_padding_mask, scale, threads)
    }
}

fn attn_bwd<'py, T: Float + Element>(
    py: Python<'py>,
    t: [&Bound<'py, PyAny>; 6],
    causal: bool,
    mask: Option<&Bound<'py, PyAny>>,
    scale: f64,
    threads: usize,
) -> PyResult<Vec<Out<'py>>> {
    let names = ["q", "k", "v", "o", "lse", "grad_output"];
    let a: Vec<PyReadonlyArrayDyn<'py, T>> =
        t.iter().zip(names).map(|(x, n)| arr::<T>(n, x)).collect::<PyResult<_>>()?;
    let sh = attn_shape(a[0].shape(), a[1].shape(), a[2].shape())?;
    let m = pad_mask(mask)?;
    let s: Vec<&[T]> = a.iter().map(sl).collect();
    let ms: Option<&[bool]> = m.as_ref().map(sl);
    let (dq, dk, dv) = py.detach(|| {
        run_kernel::<T, _>(threads, || {
            crate::kernels::attention::backward(
                s[0],
                s[1],
                s[2],
                s[3],
                s[4],
                s[5],
                sh,
                causal,
                ms,
                T::from_f64(scale),
                threads,
            )
        })
    })?;
    Ok(vec![out(py, dq, a[0].shape())?, out(py, dk, a[1].shape())?, out(py, dv, a[2].shape())?])
}

/// Attention backward: returns [dq, dk, dv].
#[pyfunction]
#[pyo3(signature = (q, k, v, o, lse, grad_output, causal, key_padding_mask, scale, threads))]
// One parameter per argument of the Python-visible `_core` signature.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    o: &Bound<'py, PyAny>,
    lse: &Bound<'py, PyAny>,
    grad_output: &Bound<'py, PyAny>,
    causal: bool,
    key_padding_mask: Option<&Bound<'py, PyAny>>,
    scale: f64,
    threads: usize,
) -> PyResult<Vec<Out<'py>>> {
    let threads = parallel::resolve_threads(Some(threads));
    let t = [q, k, v, o, lse, grad_output];
    if is_f64(q) {
        attn_bwd::<f64>(py, t, causal, key_padding_mask, scale, threads)
    } else {
        attn_bwd::<f32>(py, t, causal, key_padding_mask, scale, threads)
    }
}

fn decode_t<'py, T: Float + Element>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    lengths: Vec<usize>,
    scale: f64,
    threads: usize,
) -> PyResult<Out<'py>> {
    let (q, k, v) = (arr::<T>("q", q)?, arr::<T>("k_cache", k)?, arr::<T>("v_cache", v)?);
    let (qs, ks, vs) = (q.shape(), k.shape(), v.shape());
    if qs.len() != 3 || ks.len() != 4 || vs.len() != 4 {
        return Err(PyValueError::new_err("q must be (B, Hq, D) and the caches (B, Hk, L, D)"));
    }
    let sh = crate::kernels::decode::Shape {
        b: qs[0],
        hq: qs[1],
        hk: ks[1],
        l: ks[2],
        d: qs[2],
        dv: vs[3],
    };
    let (qd, kd, vd) = (sl(&q), sl(&k), sl(&v));
    let o = py.detach(|| {
        run_kernel::<T, _>(threads, || {
            crate::kernels::decode::decode(qd, kd, vd, &lengths, sh, T::from_f64(scale), threads)
        })
    })?;
    out(py, o, &[sh.b, sh.hq, sh.dv])
}

/// Single-token attention over KV caches: returns (B, Hq, Dv).
#[pyfunction]
#[pyo3(signature = (q, k_cache, v_cache, cache_lengths, scale, threads))]
pub fn decode_attention<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k_cache: &Bound<'py, PyAny>,
    v_cache: &Bound<'py, PyAny>,
    cache_lengths: Vec<usize>,
    scale: f64,
    threads: usize,
) -> PyResult<Out<'py>> {
    let threads = parallel::resolve_threads(Some(threads));
    if is_f64(q) {
        decode_t::<f64>(py, q, k_cache, v_cache, cache_lengths, scale, threads)
    } else {
        decode_t::<f32>(py, q, k_cache, v_cache, cache_lengths, scale, threads)
    }
}

fn dropout_t<'py, T: Float + Element>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    out: &Bound<'py, PyAny>,
    p: f64,
    seed: u64,
    threads: usize,
) -> PyResult<()> {
    let x = arr::<T>("input", x)?;
    let mut o: numpy::PyReadwriteArrayDyn<'py, T> = out.extract().map_err(|_| {
        PyTypeError::new_err(format!(
            "out must be a writable numpy array of {}",
            std::any::type_name::<T>()
        ))
    })?;
    if o.shape() != x.shape() || !o.is_c_contiguous() {
        return Err(PyValueError::new_err("out must be C-contiguous with the input's shape"));
    }
    let xs = sl(&x);
    let os = o.as_slice_mut().map_err(|_| PyValueError::new_err("out must be C-contiguous"))?;
    if std::ptr::eq(xs.as_ptr(), os.as_ptr()) {
        return Err(PyValueError::new_err("out must not be the input"));
    }
    py.detach(|| crate::kernels::dropout::apply(xs, os, p, seed, threads));
    Ok(())
}

/// Dropout with a counter-based mask into `out` (the same call on the gradient is the backward).
#[pyfunction]
#[pyo3(signature = (x, out, p, seed, threads))]
pub fn dropout<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    out: &Bound<'py, PyAny>,
    p: f64,
    seed: u64,
    threads: usize,
) -> PyResult<()> {
    if !(0.0..1.0).contains(&p) {
        return Err(PyValueError::new_err(format!(
            "dropout probability must be in [0, 1), got {p}"
        )));
    }
    let threads = parallel::resolve_threads(Some(threads));
    if is_f64(x) {
        dropout_t::<f64>(py, x, out, p, seed, threads)
    } else {
        dropout_t::<f32>(py, x, out, p, seed, threads)
    }
}
