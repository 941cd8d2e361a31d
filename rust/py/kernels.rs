//! Bindings for the fused kernels: recurrent layers, attention, single-token decode and dropout.
//! Arrays come in as C-contiguous numpy arrays of float32 or float64 (torch tensors arrive as
//! zero-copy numpy views) and go out as numpy arrays of the same dtype; results of several
//! arrays are tuples whose length never depends on a flag.
//!
//! Each binding gathers its arguments into a [`FloatCall`], which [`dispatch`] runs in the dtype
//! of the call's first array; [`array`] and [`dims`] extract and check every array (TypeError
//! for a wrong dtype or layout, ValueError for a wrong shape) before the core runs with the GIL
//! released.

use numpy::{
    Element, IntoPyArray, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn,
    PyReadwriteArrayDyn, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::kernels::attention::{self, AttentionArgs};
use crate::kernels::rnn::{self, Dims, ForwardOptions, Input, Layer, OutputGrads, Saved, State};
use crate::kernels::{decode, dropout as drop, Float};
use crate::parallel;

/// A numpy array handed back to Python (float32 or float64, as the call's inputs).
type Array<'py> = Bound<'py, PyUntypedArray>;

/// The element types the kernels run in, as numpy sees them (f32 and f64).
trait Scalar: Float + Element {}
impl<T: Float + Element> Scalar for T {}

/// A kernel call whose float arrays all share one dtype: `run::<T>` extracts them as `T`,
/// runs the core and converts its results.
trait FloatCall<'py> {
    type Output;
    fn run<T: Scalar>(self, py: Python<'py>) -> PyResult<Self::Output>;
}

/// Runs `call` in the dtype of its first array `first` (called `name` in errors): float64 or
/// float32; anything else is a TypeError.
fn dispatch<'py, C: FloatCall<'py>>(
    py: Python<'py>,
    name: &str,
    first: &Bound<'py, PyAny>,
    call: C,
) -> PyResult<C::Output> {
    let dtype = first.cast::<PyUntypedArray>().map(|a| a.dtype()).ok();
    match dtype {
        Some(d) if d.is_equiv_to(&numpy::dtype::<f64>(py)) => call.run::<f64>(py),
        Some(d) if d.is_equiv_to(&numpy::dtype::<f32>(py)) => call.run::<f32>(py),
        _ => Err(PyTypeError::new_err(format!(
            "{name} must be a numpy array of float32 or float64, got {}",
            describe(first)
        ))),
    }
}

/// What `obj` is, for error messages: "a 2-D array of int64", or its Python type.
fn describe(obj: &Bound<'_, PyAny>) -> String {
    match obj.cast::<PyUntypedArray>() {
        Ok(a) => format!("a {}-D array of {}", a.ndim(), a.dtype()),
        Err(_) => obj.get_type().name().map_or_else(|_| "?".into(), |n| n.to_string()),
    }
}

fn layout_error(name: &str) -> PyErr {
    PyTypeError::new_err(format!(
        "{name} must be C-contiguous, got a strided view; pass numpy.ascontiguousarray({name})"
    ))
}

/// `obj` as a read-only C-contiguous array of `T` (TypeError otherwise, naming `name`).
pub(super) fn array<'py, T: Element>(
    name: &str,
    obj: &Bound<'py, PyAny>,
) -> PyResult<PyReadonlyArrayDyn<'py, T>> {
    let a: PyReadonlyArrayDyn<'py, T> = obj.extract().map_err(|_| {
        PyTypeError::new_err(format!(
            "{name} must be a numpy array of {}, got {}",
            numpy::dtype::<T>(obj.py()),
            describe(obj)
        ))
    })?;
    if !a.is_c_contiguous() {
        return Err(layout_error(name));
    }
    // A slice of T must be aligned to T (numpy allows unaligned views: frombuffer at an offset).
    if !(a.data() as usize).is_multiple_of(std::mem::align_of::<T>()) {
        return Err(PyTypeError::new_err(format!(
            "{name} is not aligned to its {}-byte elements (a view at an odd byte offset); pass a copy: \
             numpy.require({name}, requirements='CA')",
            std::mem::align_of::<T>()
        )));
    }
    Ok(a)
}

/// [`array`] for an argument that is required here though Python may pass None.
fn required<'py, T: Element>(
    name: &str,
    obj: Option<&Bound<'py, PyAny>>,
    why: &str,
) -> PyResult<PyReadonlyArrayDyn<'py, T>> {
    match obj.filter(|o| !o.is_none()) {
        Some(o) => array(name, o),
        None => Err(PyTypeError::new_err(format!("{name} must be an array {why}, got None"))),
    }
}

/// [`array`] for an optional argument (None stays None).
fn optional<'py, T: Element>(
    name: &str,
    obj: Option<&Bound<'py, PyAny>>,
) -> PyResult<Option<PyReadonlyArrayDyn<'py, T>>> {
    obj.filter(|o| !o.is_none()).map(|o| array(name, o)).transpose()
}

/// The shape of `a`, which must have `N` dimensions laid out as `layout` (ValueError otherwise).
fn dims<T: Element, const N: usize>(
    a: &PyReadonlyArrayDyn<'_, T>,
    name: &str,
    layout: &str,
) -> PyResult<[usize; N]> {
    a.shape().try_into().map_err(|_| {
        PyValueError::new_err(format!("{name} must be {N}-D {layout}, got shape {:?}", a.shape()))
    })
}

/// A ValueError unless the array `name` has the shape `want`.
fn expect_shape(name: &str, shape: &[usize], want: &[usize]) -> PyResult<()> {
    if shape != want {
        return Err(PyValueError::new_err(format!(
            "{name} has shape {shape:?}, expected {want:?}"
        )));
    }
    Ok(())
}

fn sl<'a, T: Element>(a: &'a PyReadonlyArrayDyn<'_, T>) -> &'a [T] {
    a.as_slice().expect("C-contiguity is checked on extraction")
}

fn out<'py, T: Element>(py: Python<'py>, v: Vec<T>, shape: &[usize]) -> PyResult<Array<'py>> {
    let a = numpy::ndarray::ArrayD::from_shape_vec(shape.to_vec(), v)
        .map_err(|e| PyValueError::new_err(format!("internal shape error: {e}")))?;
    Ok(a.into_pyarray(py).as_untyped().clone())
}

/// Runs a kernel with the GIL released: f32 on the calling thread (its thread team is torch's
/// OpenMP team when torch is loaded, see `kernels::team`; moving to a rayon worker first would
/// make libgomp start a second team for that thread), f64 (whose products use the `gemm` crate
/// on rayon) inside ferrolm's sized rayon pool.
fn compute<T: 'static, R: Send>(py: Python<'_>, threads: usize, f: impl FnOnce() -> R + Send) -> R {
    py.detach(|| {
        if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() {
            f()
        } else {
            parallel::install(threads, f)
        }
    })
}

fn parse_mode(mode: &str) -> PyResult<bool> {
    match mode {
        "lstm" => Ok(true),
        "gru" => Ok(false),
        other => Err(PyValueError::new_err(format!("mode must be 'lstm' or 'gru', got {other:?}"))),
    }
}

/// One layer direction's arguments as passed from Python (shared by forward and backward).
struct RnnCall<'a, 'py> {
    lstm: bool,
    x: &'a Bound<'py, PyAny>,
    batch_sizes: &'a [usize],
    reverse: bool,
    h0: &'a Bound<'py, PyAny>,
    c0: Option<&'a Bound<'py, PyAny>>,
    weights: [&'a Bound<'py, PyAny>; 2],
    biases: [Option<&'a Bound<'py, PyAny>>; 2],
    threads: usize,
}

/// Those arrays extracted as `T` (read-only views the core borrows), and the layer's sizes.
struct RnnArrays<'py, T: Element> {
    x: PyReadonlyArrayDyn<'py, T>,
    h0: PyReadonlyArrayDyn<'py, T>,
    /// LSTM only.
    c0: Option<PyReadonlyArrayDyn<'py, T>>,
    w_ih: PyReadonlyArrayDyn<'py, T>,
    w_hh: PyReadonlyArrayDyn<'py, T>,
    b_ih: Option<PyReadonlyArrayDyn<'py, T>>,
    b_hh: Option<PyReadonlyArrayDyn<'py, T>>,
    dims: Dims,
    /// Rows of `x` (N).
    rows: usize,
}

impl<'py> RnnCall<'_, 'py> {
    fn extract<T: Scalar>(&self) -> PyResult<RnnArrays<'py, T>> {
        let x = array::<T>("input", self.x)?;
        let [rows, input] = dims(&x, "input", "(N, input_size)")?;
        let w_hh = array::<T>("weight_hh", self.weights[1])?;
        let [_, hidden] = dims(&w_hh, "weight_hh", "(gates * hidden_size, hidden_size)")?;
        let c0 = if self.lstm { Some(required("c0", self.c0, "for mode='lstm'")?) } else { None };
        Ok(RnnArrays {
            h0: array("h0", self.h0)?,
            c0,
            w_ih: array("weight_ih", self.weights[0])?,
            b_ih: optional("bias_ih", self.biases[0])?,
            b_hh: optional("bias_hh", self.biases[1])?,
            x,
            w_hh,
            dims: Dims { input, hidden },
            rows,
        })
    }
}

impl<T: Scalar> RnnArrays<'_, T> {
    fn layer(&self) -> Layer<'_, T> {
        Layer {
            dims: self.dims,
            w_ih: sl(&self.w_ih),
            w_hh: sl(&self.w_hh),
            b_ih: self.b_ih.as_ref().map(sl),
            b_hh: self.b_hh.as_ref().map(sl),
        }
    }

    fn input<'s>(&'s self, call: &RnnCall<'s, '_>) -> Input<'s, T> {
        Input { x: sl(&self.x), batch_sizes: call.batch_sizes, reverse: call.reverse }
    }

    /// The initial state (`c0` empty for the GRU).
    fn init(&self) -> State<'_, T> {
        State { h0: sl(&self.h0), c0: self.c0.as_ref().map_or(&[], sl) }
    }
}

/// `rnn_forward`'s result: y, h_n, c_n (None for the GRU), and the gate activations and cell
/// states (GRU: recurrent candidate parts), both None without `keep`.
type RnnForwardOut<'py> =
    (Array<'py>, Array<'py>, Option<Array<'py>>, Option<Array<'py>>, Option<Array<'py>>);

struct RnnForward<'a, 'py> {
    call: RnnCall<'a, 'py>,
    keep: bool,
    batch_first: bool,
}

impl<'py> FloatCall<'py> for RnnForward<'_, 'py> {
    type Output = RnnForwardOut<'py>;

    fn run<T: Scalar>(self, py: Python<'py>) -> PyResult<Self::Output> {
        let Self { call, keep, batch_first } = self;
        let a = call.extract::<T>()?;
        let (h, n, bsz) = (a.dims.hidden, a.rows, call.batch_sizes.first().copied().unwrap_or(0));
        let opts = ForwardOptions { keep, batch_first, threads: call.threads };
        let (layer, input, init) = (a.layer(), a.input(&call), a.init());
        // The kept arrays of `width` columns: Some only with `keep`.
        let kept = |v: Vec<T>, width: usize| keep.then(|| out(py, v, &[n, width])).transpose();
        if call.lstm {
            let o =
                compute::<T, _>(py, call.threads, || rnn::lstm_forward(&layer, input, init, opts))?;
            Ok((
                out(py, o.y, &[n, h])?,
                out(py, o.h_n, &[bsz, h])?,
                Some(out(py, o.c_n, &[bsz, h])?),
                kept(o.gates, 4 * h)?,
                kept(o.cs, h)?,
            ))
        } else {
            let o = compute::<T, _>(py, call.threads, || {
                rnn::gru_forward(&layer, input, init.h0, opts)
            })?;
            Ok((
                out(py, o.y, &[n, h])?,
                out(py, o.h_n, &[bsz, h])?,
                None,
                kept(o.gates, 3 * h)?,
                kept(o.hn, h)?,
            ))
        }
    }
}

/// One layer direction forward: returns (y, h_n, c_n, gates, cell_or_candidate), c_n None for
/// a GRU. With `keep` false (no backward will follow) the last two are None; with
/// `batch_first` (inference, one length) x is (B*T, I) in batch-first row order and y comes
/// back so.
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
) -> PyResult<RnnForwardOut<'py>> {
    let call = RnnCall {
        lstm: parse_mode(mode)?,
        x,
        batch_sizes: &batch_sizes,
        reverse,
        h0,
        c0,
        weights: [w_ih, w_hh],
        biases: [b_ih, b_hh],
        threads: parallel::resolve_threads(Some(threads)),
    };
    dispatch(py, "input", x, RnnForward { call, keep, batch_first })
}

/// `rnn_backward`'s result: dgx, dgh (None for the LSTM: equal to dgx), hprev, dh0, and dc0
/// (None for the GRU).
type RnnBackwardOut<'py> =
    (Array<'py>, Option<Array<'py>>, Array<'py>, Array<'py>, Option<Array<'py>>);

struct RnnBackward<'a, 'py> {
    call: RnnCall<'a, 'py>,
    /// y, gates, cs: what the forward kept.
    saved: [&'a Bound<'py, PyAny>; 3],
    /// The output gradients dy, dh_n, dc_n (dc_n LSTM only).
    grads: [Option<&'a Bound<'py, PyAny>>; 3],
}

impl<'py> FloatCall<'py> for RnnBackward<'_, 'py> {
    type Output = RnnBackwardOut<'py>;

    fn run<T: Scalar>(self, py: Python<'py>) -> PyResult<Self::Output> {
        let Self { call, saved, grads } = self;
        let a = call.extract::<T>()?;
        let (y, gates, cs) = (
            array::<T>("y", saved[0])?,
            array::<T>("gates", saved[1])?,
            array::<T>("cs", saved[2])?,
        );
        let dy = required::<T>("grad_output", grads[0], "for the backward")?;
        let dh_n = required::<T>("grad_h_n", grads[1], "for the backward")?;
        let dc_n = if call.lstm {
            Some(required::<T>("grad_c_n", grads[2], "for mode='lstm'")?)
        } else {
            None
        };
        let (h, n, bsz) = (a.dims.hidden, a.rows, call.batch_sizes.first().copied().unwrap_or(0));
        let (layer, input, init) = (a.layer(), a.input(&call), a.init());
        let s = Saved { y: sl(&y), gates: sl(&gates), cs: sl(&cs) };
        let up = OutputGrads { dy: sl(&dy), dh_n: sl(&dh_n), dc_n: dc_n.as_ref().map_or(&[], sl) };
        let (lstm, threads) = (call.lstm, call.threads);
        let g = compute::<T, _>(py, threads, || {
            if lstm {
                rnn::lstm_backward(&layer, input, init, s, up, threads)
            } else {
                rnn::gru_backward(&layer, input, init.h0, s, up, threads)
            }
        })?;
        let (dgh, dc0) = if lstm {
            (None, Some(out(py, g.dc0, &[bsz, h])?))
        } else {
            (Some(out(py, g.dgh, &[n, g.ldg])?), None)
        };
        Ok((
            out(py, g.dgx, &[n, g.ldg])?,
            dgh,
            out(py, g.hprev, &[n, h])?,
            out(py, g.dh0, &[bsz, h])?,
            dc0,
        ))
    }
}

/// One layer direction's backward through time: returns (dgx, dgh, hprev, dh0, dc0), dgh None
/// for an LSTM (equal to dgx) and dc0 None for a GRU; the gate gradients are (N, stride)
/// arrays whose first G*H columns are the gradients (rows padded off 1 KiB multiples), for the
/// caller's GEMMs.
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
) -> PyResult<RnnBackwardOut<'py>> {
    let call = RnnCall {
        lstm: parse_mode(mode)?,
        x,
        batch_sizes: &batch_sizes,
        reverse,
        h0,
        c0,
        weights: [w_ih, w_hh],
        biases: [b_ih, b_hh],
        threads: parallel::resolve_threads(Some(threads)),
    };
    dispatch(py, "input", x, RnnBackward { call, saved: [y, gates, cs], grads: [dy, dh_n, dc_n] })
}

/// One attention call's arguments as passed from Python.
struct AttentionCall<'a, 'py> {
    q: &'a Bound<'py, PyAny>,
    k: &'a Bound<'py, PyAny>,
    v: &'a Bound<'py, PyAny>,
    causal: bool,
    key_padding_mask: Option<&'a Bound<'py, PyAny>>,
    scale: f64,
    threads: usize,
}

/// Those arrays extracted as `T`, and their shape.
struct AttentionArrays<'py, T: Element> {
    q: PyReadonlyArrayDyn<'py, T>,
    k: PyReadonlyArrayDyn<'py, T>,
    v: PyReadonlyArrayDyn<'py, T>,
    mask: Option<PyReadonlyArrayDyn<'py, bool>>,
    shape: attention::Shape,
}

impl<'py> AttentionCall<'_, 'py> {
    fn extract<T: Scalar>(&self) -> PyResult<AttentionArrays<'py, T>> {
        let (q, k, v) = (array::<T>("q", self.q)?, array::<T>("k", self.k)?, array("v", self.v)?);
        let [b, hq, tq, d] = dims(&q, "q", "(batch, heads, time, head_dim)")?;
        let [_, hk, tk, _] = dims(&k, "k", "(batch, kv_heads, time, head_dim)")?;
        let [_, _, _, dv] = dims(&v, "v", "(batch, kv_heads, time, v_head_dim)")?;
        expect_shape("k", k.shape(), &[b, hk, tk, d])?;
        expect_shape("v", v.shape(), &[b, hk, tk, dv])?;
        let mask = optional::<bool>("key_padding_mask", self.key_padding_mask)?;
        if let Some(m) = &mask {
            expect_shape("key_padding_mask", m.shape(), &[b, tk])?;
        }
        let shape = attention::Shape { b, hq, hk, tq, tk, d, dv };
        Ok(AttentionArrays { q, k, v, mask, shape })
    }
}

impl<T: Scalar> AttentionArrays<'_, T> {
    fn args(&self, call: &AttentionCall<'_, '_>) -> AttentionArgs<'_, T> {
        AttentionArgs {
            q: sl(&self.q),
            k: sl(&self.k),
            v: sl(&self.v),
            shape: self.shape,
            causal: call.causal,
            key_padding: self.mask.as_ref().map(sl),
            scale: T::from_f64(call.scale),
            threads: call.threads,
        }
    }
}

struct AttentionForward<'a, 'py>(AttentionCall<'a, 'py>);

impl<'py> FloatCall<'py> for AttentionForward<'_, 'py> {
    type Output = (Array<'py>, Array<'py>);

    fn run<T: Scalar>(self, py: Python<'py>) -> PyResult<Self::Output> {
        let a = self.0.extract::<T>()?;
        let (args, sh) = (a.args(&self.0), a.shape);
        let (o, lse) = compute::<T, _>(py, args.threads, || attention::forward(&args))?;
        Ok((out(py, o, &[sh.b, sh.hq, sh.tq, sh.dv])?, out(py, lse, &[sh.b, sh.hq, sh.tq])?))
    }
}

/// Attention forward: returns (o, lse).
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
) -> PyResult<(Array<'py>, Array<'py>)> {
    let threads = parallel::resolve_threads(Some(threads));
    let call = AttentionCall { q, k, v, causal, key_padding_mask, scale, threads };
    dispatch(py, "q", q, AttentionForward(call))
}

struct AttentionBackward<'a, 'py> {
    call: AttentionCall<'a, 'py>,
    /// o, lse (what the forward returned) and grad_output.
    saved: [&'a Bound<'py, PyAny>; 3],
}

impl<'py> FloatCall<'py> for AttentionBackward<'_, 'py> {
    type Output = (Array<'py>, Array<'py>, Array<'py>);

    fn run<T: Scalar>(self, py: Python<'py>) -> PyResult<Self::Output> {
        let a = self.call.extract::<T>()?;
        let sh = a.shape;
        let o = array::<T>("o", self.saved[0])?;
        let lse = array::<T>("lse", self.saved[1])?;
        let d_o = array::<T>("grad_output", self.saved[2])?;
        expect_shape("o", o.shape(), &[sh.b, sh.hq, sh.tq, sh.dv])?;
        expect_shape("lse", lse.shape(), &[sh.b, sh.hq, sh.tq])?;
        expect_shape("grad_output", d_o.shape(), &[sh.b, sh.hq, sh.tq, sh.dv])?;
        let args = a.args(&self.call);
        let (os, ls, ds) = (sl(&o), sl(&lse), sl(&d_o));
        let (dq, dk, dv) =
            compute::<T, _>(py, args.threads, || attention::backward(&args, os, ls, ds))?;
        Ok((out(py, dq, a.q.shape())?, out(py, dk, a.k.shape())?, out(py, dv, a.v.shape())?))
    }
}

/// Attention backward: returns (dq, dk, dv).
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
) -> PyResult<(Array<'py>, Array<'py>, Array<'py>)> {
    let threads = parallel::resolve_threads(Some(threads));
    let call = AttentionCall { q, k, v, causal, key_padding_mask, scale, threads };
    dispatch(py, "q", q, AttentionBackward { call, saved: [o, lse, grad_output] })
}

struct DecodeCall<'a, 'py> {
    q: &'a Bound<'py, PyAny>,
    k_cache: &'a Bound<'py, PyAny>,
    v_cache: &'a Bound<'py, PyAny>,
    cache_lengths: Vec<usize>,
    scale: f64,
    threads: usize,
}

impl<'py> FloatCall<'py> for DecodeCall<'_, 'py> {
    type Output = Array<'py>;

    fn run<T: Scalar>(self, py: Python<'py>) -> PyResult<Self::Output> {
        let q = array::<T>("q", self.q)?;
        let (k, v) = (array::<T>("k_cache", self.k_cache)?, array::<T>("v_cache", self.v_cache)?);
        let [b, hq, d] = dims(&q, "q", "(batch, heads, head_dim)")?;
        let [_, hk, l, _] = dims(&k, "k_cache", "(batch, kv_heads, capacity, head_dim)")?;
        let [_, _, _, dv] = dims(&v, "v_cache", "(batch, kv_heads, capacity, v_head_dim)")?;
        expect_shape("k_cache", k.shape(), &[b, hk, l, d])?;
        expect_shape("v_cache", v.shape(), &[b, hk, l, dv])?;
        let sh = decode::Shape { b, hq, hk, l, d, dv };
        let (qd, kd, vd) = (sl(&q), sl(&k), sl(&v));
        let (lengths, scale, threads) =
            (&self.cache_lengths, T::from_f64(self.scale), self.threads);
        let o = compute::<T, _>(py, threads, || {
            decode::decode(qd, kd, vd, lengths, sh, scale, threads)
        })?;
        out(py, o, &[b, hq, dv])
    }
}

impl<'py> DecodeCall<'_, 'py> {
    /// float32 queries over float16 caches (converted to f32 block by block in the kernel).
    fn run_f16(self, py: Python<'py>) -> PyResult<Array<'py>> {
        let q = array::<f32>("q", self.q).map_err(|_| {
            PyTypeError::new_err(format!(
                "float16 KV caches need float32 queries, got q as {}",
                describe(self.q)
            ))
        })?;
        let (k, v) = (
            array::<half::f16>("k_cache", self.k_cache)?,
            array::<half::f16>("v_cache", self.v_cache)?,
        );
        let [b, hq, d] = dims(&q, "q", "(batch, heads, head_dim)")?;
        let [_, hk, l, _] = dims(&k, "k_cache", "(batch, kv_heads, capacity, head_dim)")?;
        let [_, _, _, dv] = dims(&v, "v_cache", "(batch, kv_heads, capacity, v_head_dim)")?;
        expect_shape("k_cache", k.shape(), &[b, hk, l, d])?;
        expect_shape("v_cache", v.shape(), &[b, hk, l, dv])?;
        let sh = decode::Shape { b, hq, hk, l, d, dv };
        let (qd, kd, vd) = (sl(&q), sl(&k), sl(&v));
        let (lengths, scale, threads) = (&self.cache_lengths, self.scale as f32, self.threads);
        let o = compute::<f32, _>(py, threads, || {
            decode::decode_kv(qd, kd, vd, lengths, sh, scale, threads)
        })?;
        out(py, o, &[b, hq, dv])
    }
}

/// Single-token attention over KV caches: returns (B, Hq, Dv). The caches share q's dtype
/// (float32 or float64), or are float16 with float32 queries.
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
) -> PyResult<Array<'py>> {
    let threads = parallel::resolve_threads(Some(threads));
    let call = DecodeCall { q, k_cache, v_cache, cache_lengths, scale, threads };
    let f16 = k_cache
        .cast::<PyUntypedArray>()
        .is_ok_and(|a| a.dtype().is_equiv_to(&numpy::dtype::<half::f16>(py)));
    if f16 {
        return call.run_f16(py);
    }
    dispatch(py, "q", q, call)
}

struct DropoutCall<'a, 'py> {
    x: &'a Bound<'py, PyAny>,
    out: &'a Bound<'py, PyAny>,
    p: f64,
    seed: u64,
    threads: usize,
}

impl<'py> FloatCall<'py> for DropoutCall<'_, 'py> {
    type Output = ();

    fn run<T: Scalar>(self, py: Python<'py>) -> PyResult<()> {
        let x = array::<T>("input", self.x)?;
        let o = self.out.cast::<PyArrayDyn<T>>().map_err(|_| {
            PyTypeError::new_err(format!(
                "out must be a numpy array of {}, got {}",
                numpy::dtype::<T>(py),
                describe(self.out)
            ))
        })?;
        // Fails for a read-only array, and for one sharing memory with the input (rust-numpy
        // tracks the borrows of both).
        let mut o: PyReadwriteArrayDyn<'py, T> = o.try_readwrite().map_err(|_| {
            PyValueError::new_err("out must be a writable array that does not overlap the input")
        })?;
        if !o.is_c_contiguous() {
            return Err(layout_error("out"));
        }
        expect_shape("out", o.shape(), x.shape())?;
        let xs = sl(&x);
        let os = o.as_slice_mut().map_err(|_| layout_error("out"))?;
        let (p, seed, threads) = (self.p, self.seed, self.threads);
        py.detach(|| drop::apply(xs, os, p, seed, threads));
        Ok(())
    }
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
    dispatch(py, "x", x, DropoutCall { x, out, p, seed, threads })
}
