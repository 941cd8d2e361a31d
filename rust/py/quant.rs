//! Bindings for the quantized kernels (`kernels::quant`): products with GGUF-block weights,
//! quantizing and dequantizing rows, and row gathers (embedding lookups). Weights arrive as
//! C-contiguous uint8 arrays (torch's uint8 buffers as zero-copy numpy views) with their
//! logical shape (n, k) given apart; every length is checked against the type before the
//! kernel runs with the GIL released.

use numpy::{
    Element, PyArray2, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn,
    PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use super::data::to2;
use super::kernels::array;
use crate::kernels::decode::KvElem;
use crate::kernels::quant::packed::Packed;
use crate::kernels::quant::{self, engine, Isa, QType};
use crate::kernels::team;
use crate::parallel;

fn qtype(name: &str) -> PyResult<QType> {
    QType::from_name(name).ok_or_else(|| {
        let names: Vec<&str> = QType::ALL.iter().map(|t| t.name()).collect();
        PyValueError::new_err(format!(
            "unknown block type {name:?}; expected one of {}",
            names.join(", ")
        ))
    })
}

fn isa(name: Option<&str>) -> PyResult<Isa> {
    match name {
        None => Ok(Isa::detect()),
        Some(s) => {
            let i = Isa::from_name(s).ok_or_else(|| {
                PyValueError::new_err(format!(
                    "unknown isa {s:?}; expected scalar, avx2 or avx512vnni"
                ))
            })?;
            if !i.available() {
                return Err(PyValueError::new_err(format!(
                    "this CPU cannot run the {} path",
                    i.name()
                )));
            }
            Ok(i)
        }
    }
}

fn weights<'py>(
    w: &Bound<'py, PyAny>,
    n: usize,
    k: usize,
    qt: QType,
) -> PyResult<PyReadonlyArrayDyn<'py, u8>> {
    let a = array::<u8>("weights", w)?;
    quant::check(qt, n, k, a.len()).map_err(PyValueError::new_err)?;
    Ok(a)
}

/// `x (m, k) float32 · Wᵀ` -> (m, n) float32, W given as (n, k) in `qtype` blocks.
#[pyfunction]
#[pyo3(signature = (x, w, n, k, qtype, threads, isa=None))]
#[allow(clippy::too_many_arguments)]
pub fn quant_matmul<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    w: &Bound<'py, PyAny>,
    n: usize,
    k: usize,
    qtype: &str,
    threads: usize,
    isa: Option<&str>,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let qt = self::qtype(qtype)?;
    let path = self::isa(isa)?;
    let w = weights(w, n, k, qt)?;
    let x = array::<f32>("x", x)?;
    let shape = x.shape();
    if shape.len() != 2 || shape[1] != k {
        return Err(PyValueError::new_err(format!("x must have shape (m, {k}), got {shape:?}")));
    }
    let m = shape[0];
    let threads = parallel::resolve_threads(Some(threads));
    let (xs, ws) = (x.as_slice()?, w.as_slice()?);
    let y = py.detach(|| {
        let mut y = vec![0f32; m * n];
        quant::matmul(xs, m, k, ws, n, qt, path, threads, &mut y);
        y
    });
    to2(py, y, m, n)
}

/// A weight matrix's blocks interleaved by 16 rows ([`Packed`]): the layout the batch-1 and
/// few-row integer kernels read fastest. Built once per weight (a copy of its bytes).
#[pyclass(frozen, module = "ferrolm._core")]
pub struct QuantPacked(pub Packed);

#[pymethods]
impl QuantPacked {
    /// Packs `w` (n, k in `qtype` blocks). ValueError when the type is not one of Q8_0,
    /// Q4_0, Q4_1 or `n` is not a multiple of 16 (`QuantPacked.supports`).
    #[new]
    fn new(
        py: Python<'_>,
        w: &Bound<'_, PyAny>,
        n: usize,
        k: usize,
        qtype: &str,
    ) -> PyResult<Self> {
        let qt = self::qtype(qtype)?;
        let w = weights(w, n, k, qt)?;
        let ws = w.as_slice()?;
        let p = py.detach(|| Packed::new(qt, ws, n, k)).ok_or_else(|| {
            PyValueError::new_err(format!(
                "{} weights of {n} rows cannot be interleaved (Q8_0, Q4_0 or Q4_1 with a \
                 multiple of 16 rows)",
                qt.name()
            ))
        })?;
        Ok(QuantPacked(p))
    }

    /// Whether weights of this type and row count can be packed.
    #[staticmethod]
    fn supports(qtype: &str, n: usize) -> PyResult<bool> {
        Ok(Packed::supports(self::qtype(qtype)?, n))
    }

    #[getter]
    fn shape(&self) -> (usize, usize) {
        (self.0.n, self.0.k)
    }

    #[getter]
    fn qtype(&self) -> &'static str {
        self.0.qt.name()
    }

    /// `x (m, k) float32 · Wᵀ` -> (m, n) float32 (activations quantized to 8 bits per group
    /// of 32), output rows split across `threads`.
    #[pyo3(signature = (x, threads, isa=None))]
    fn matmul<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        threads: usize,
        isa: Option<&str>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let path = self::isa(isa)?;
        let (n, k) = (self.0.n, self.0.k);
        let x = array::<f32>("x", x)?;
        let shape = x.shape();
        if shape.len() != 2 || shape[1] != k {
            return Err(PyValueError::new_err(format!(
                "x must have shape (m, {k}), got {shape:?}"
            )));
        }
        let m = shape[0];
        let threads = parallel::resolve_threads(Some(threads));
        let xs = x.as_slice()?;
        let y = py.detach(|| {
            let mut y = vec![0f32; m * n];
            if m > 0 {
                let acts = quant::QuantRows::new(xs, m, k, threads);
                quant::packed::matmul(path, &self.0, &acts, threads, &mut y);
            }
            y
        });
        to2(py, y, m, n)
    }
}

/// W (n, k in `qtype` blocks) -> float32 (n, k), rows split across `threads`.
#[pyfunction]
#[pyo3(signature = (w, n, k, qtype, threads=1))]
pub fn quant_dequantize<'py>(
    py: Python<'py>,
    w: &Bound<'py, PyAny>,
    n: usize,
    k: usize,
    qtype: &str,
    threads: usize,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let qt = self::qtype(qtype)?;
    let w = weights(w, n, k, qt)?;
    let ws = w.as_slice()?;
    let row = qt.row_bytes(k).unwrap_or(0);
    let threads = parallel::resolve_threads(Some(threads));
    let out = py.detach(|| {
        let mut out = vec![0f32; n * k];
        let chunk = 64;
        let o = team::Shared(out.as_mut_ptr());
        team::for_each(threads, n.div_ceil(chunk), |item| {
            for r in item * chunk..((item + 1) * chunk).min(n) {
                // SAFETY: row r of out (n × k) is written by this item only.
                let dst = unsafe { std::slice::from_raw_parts_mut(o.ptr().add(r * k), k) };
                quant::dequantize_row(qt, &ws[r * row..(r + 1) * row], dst);
            }
        });
        out
    });
    to2(py, out, n, k)
}

/// Rows `ids` of W (n, k in `qtype` blocks) -> float32 (len(ids), k).
#[pyfunction]
pub fn quant_gather<'py>(
    py: Python<'py>,
    w: &Bound<'py, PyAny>,
    n: usize,
    k: usize,
    qtype: &str,
    ids: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let qt = self::qtype(qtype)?;
    let w = weights(w, n, k, qt)?;
    let ids = array::<i64>("ids", ids)?;
    let mut rows = Vec::with_capacity(ids.len());
    for &i in ids.as_slice()? {
        if i < 0 || i as usize >= n {
            return Err(PyValueError::new_err(format!("id {i} is out of range for {n} rows")));
        }
        rows.push(i as usize);
    }
    let ws = w.as_slice()?;
    let out = py.detach(|| {
        let mut out = vec![0f32; rows.len() * k];
        quant::gather_rows(ws, k, qt, &rows, &mut out);
        out
    });
    to2(py, out, rows.len(), k)
}

/// float32 (n, k) -> W (n, row bytes) in `qtype` blocks.
#[pyfunction]
pub fn quant_quantize<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    qtype: &str,
) -> PyResult<Bound<'py, PyArray2<u8>>> {
    let qt = self::qtype(qtype)?;
    let x = array::<f32>("x", x)?;
    let shape = x.shape().to_vec();
    if shape.len() != 2 {
        return Err(PyValueError::new_err(format!("x must be 2-D (rows, k), got shape {shape:?}")));
    }
    let (n, k) = (shape[0], shape[1]);
    let row = qt.row_bytes(k).ok_or_else(|| {
        PyValueError::new_err(format!(
            "{}: the row width {k} is not a multiple of the block size {}",
            qt.name(),
            qt.block_values()
        ))
    })?;
    let xs = x.as_slice()?;
    if xs.iter().any(|v| !v.is_finite()) {
        return Err(PyValueError::new_err("x has NaN or infinite values; blocks cannot hold them"));
    }
    let out = py.detach(|| {
        let mut out = vec![0u8; n * row];
        for (o, r) in out.chunks_exact_mut(row.max(1)).zip(xs.chunks_exact(k.max(1))) {
            quant::quantize_row(qt, r, o);
        }
        out
    });
    to2(py, out, n, row)
}

/// The path the kernels take on this CPU (`FERROLM_QUANT_ISA` respected) and all it can run.
#[pyfunction]
pub fn quant_isa() -> (String, Vec<String>) {
    let all = [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni];
    (
        Isa::detect().name().to_string(),
        all.iter().filter(|i| i.available()).map(|i| i.name().to_string()).collect(),
    )
}

/// A linear layer as the stepper keeps it: raw pointers into arrays it holds references to.
struct LinDesc {
    qt: Option<QType>,
    ptr: *const u8,
    len: usize,
    n: usize,
    k: usize,
    bias: Option<(*const f32, usize)>,
    /// The blocks interleaved by 16 rows for the batch-1 kernels (given with the weight, or
    /// packed by the stepper).
    packed: Option<Py<QuantPacked>>,
}

struct LayerDesc {
    attn_norm: (*const f32, usize),
    lin: [LinDesc; 7],
    ffn_norm: (*const f32, usize),
}

/// A whole-model decoding step for a Llama-family model (`kernels::quant::engine`), bound to
/// one set of weights and one set of KV caches (the torch tensors of `ferrolm.nn.KVCache`,
/// written in place). Holds references to every array it reads, so they stay alive; the
/// Python side must not resize or reallocate them while the stepper exists.
#[pyclass(unsendable)]
pub struct LlamaStepper {
    keep: Vec<Py<PyAny>>,
    embed: LinDesc,
    head: LinDesc,
    norm: (*const f32, usize),
    layers: Vec<LayerDesc>,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    eps: f32,
    inv_freq: Vec<f32>,
    kv: KvPtrs,
    batch: usize,
    capacity: usize,
    vocab: usize,
}

/// The KV caches' data pointers (keys, values), float32 or float16.
enum KvPtrs {
    F32(Vec<*mut f32>, Vec<*mut f32>),
    F16(Vec<*mut half::f16>, Vec<*mut half::f16>),
}

/// The data pointer of one layer's key or value cache, checked: an `E` array, C-contiguous,
/// writable, (B, n_kv_head, capacity, head_dim) with the (B, capacity) of the others.
fn cache_ptr<E: Element>(
    c: &Bound<'_, PyAny>,
    what: &str,
    kv_shape: (usize, usize),
    dims: &mut Option<(usize, usize)>,
) -> PyResult<*mut E> {
    let (n_kv_head, head_dim) = kv_shape;
    let a = c.cast::<PyArrayDyn<E>>().map_err(|_| {
        PyTypeError::new_err(format!(
            "{what} cache must be a float32 or float16 numpy array, every cache the same dtype"
        ))
    })?;
    // Fails for a read-only array; the borrow is released at once (the stepper writes through
    // the raw pointer, during its own calls only).
    let writable = a.try_readwrite().is_ok();
    let aligned = (a.data() as usize).is_multiple_of(std::mem::align_of::<E>());
    if !a.is_c_contiguous() || !writable || !aligned {
        return Err(PyTypeError::new_err(format!(
            "{what} cache must be C-contiguous, aligned and writable"
        )));
    }
    let shape = a.shape().to_vec();
    if shape.len() != 4 || shape[1] != n_kv_head || shape[3] != head_dim {
        return Err(PyValueError::new_err(format!(
            "{what} cache has shape {shape:?}, expected (B, {n_kv_head}, capacity, {head_dim})"
        )));
    }
    if *dims.get_or_insert((shape[0], shape[2])) != (shape[0], shape[2]) {
        return Err(PyValueError::new_err("the caches differ in batch or capacity"));
    }
    Ok(a.data())
}

fn f32_array(
    keep: &mut Vec<Py<PyAny>>,
    name: &str,
    obj: &Bound<'_, PyAny>,
) -> PyResult<(*const f32, usize)> {
    let a = array::<f32>(name, obj)?;
    let r = (a.as_slice()?.as_ptr(), a.len());
    keep.push(obj.clone().unbind());
    Ok(r)
}

/// `(array, qtype or None, n, k, bias or None)` -> a [`LinDesc`].
fn lin_desc(keep: &mut Vec<Py<PyAny>>, name: &str, t: &Bound<'_, PyAny>) -> PyResult<LinDesc> {
    let what = "(array, qtype or None, n, k, bias or None[, QuantPacked or None])";
    let bad = || PyTypeError::new_err(format!("{name}: expected {what}"));
    let parts: Vec<Bound<'_, PyAny>> = t.extract().map_err(|_| bad())?;
    if parts.len() != 5 && parts.len() != 6 {
        return Err(bad());
    }
    let arr = parts[0].clone();
    let qt: Option<String> = parts[1].extract().map_err(|_| bad())?;
    let (n, k): (usize, usize) =
        (parts[2].extract().map_err(|_| bad())?, parts[3].extract().map_err(|_| bad())?);
    let bias: Option<Bound<'_, PyAny>> = parts[4].extract().map_err(|_| bad())?;
    let packed: Option<Py<QuantPacked>> = match parts.get(5) {
        Some(p) if !p.is_none() => Some(p.extract().map_err(|_| bad())?),
        _ => None,
    };
    let bias = match bias {
        Some(b) => Some(f32_array(keep, &format!("{name} bias"), &b)?),
        None => None,
    };
    let (qt, ptr, len) = match qt {
        Some(q) => {
            let qt = qtype(&q)?;
            let a = array::<u8>(name, &arr)?;
            (Some(qt), a.as_slice()?.as_ptr(), a.len())
        }
        None => {
            let a = array::<f32>(name, &arr)?;
            (None, a.as_slice()?.as_ptr() as *const u8, a.len())
        }
    };
    if let Some(p) = &packed {
        let p = &p.get().0;
        if Some(p.qt) != qt || (p.n, p.k) != (n, k) {
            return Err(PyValueError::new_err(format!(
                "{name}: the packed weight is {} ({}, {}), the blocks {} ({n}, {k})",
                p.qt.name(),
                p.n,
                p.k,
                qt.map_or("float32", |q| q.name())
            )));
        }
    }
    keep.push(arr.unbind());
    Ok(LinDesc { qt, ptr, len, n, k, bias, packed })
}

/// # Safety
/// `d` points into an array the stepper keeps alive, of `d.len` elements of its type.
unsafe fn linear<'a>(d: &'a LinDesc) -> engine::Linear<'a> {
    let w = match (&d.packed, d.qt) {
        (Some(p), _) => engine::Weight::P(&p.get().0),
        (None, Some(qt)) => engine::Weight::Q { w: std::slice::from_raw_parts(d.ptr, d.len), qt },
        (None, None) => engine::Weight::F(std::slice::from_raw_parts(d.ptr as *const f32, d.len)),
    };
    let bias = d.bias.map(|(p, n)| std::slice::from_raw_parts(p, n));
    engine::Linear { w, n: d.n, k: d.k, bias }
}

/// # Safety
/// As [`linear`].
unsafe fn floats<'a>(p: (*const f32, usize)) -> &'a [f32] {
    std::slice::from_raw_parts(p.0, p.1)
}

impl LlamaStepper {
    /// The engine's view of the weights (valid while `self` lives).
    fn model(&self) -> engine::Model<'_> {
        // SAFETY: every pointer comes from an array in `self.keep`, checked contiguous and of
        // the recorded length when the stepper was built.
        unsafe {
            engine::Model {
                embed: linear(&self.embed),
                head: linear(&self.head),
                norm: floats(self.norm),
                layers: self
                    .layers
                    .iter()
                    .map(|l| engine::Layer {
                        attn_norm: floats(l.attn_norm),
                        q: linear(&l.lin[0]),
                        k: linear(&l.lin[1]),
                        v: linear(&l.lin[2]),
                        o: linear(&l.lin[3]),
                        ffn_norm: floats(l.ffn_norm),
                        gate: linear(&l.lin[4]),
                        up: linear(&l.lin[5]),
                        down: linear(&l.lin[6]),
                    })
                    .collect(),
                n_head: self.n_head,
                n_kv_head: self.n_kv_head,
                head_dim: self.head_dim,
                eps: self.eps,
                inv_freq: &self.inv_freq,
            }
        }
    }
}

#[pymethods]
impl LlamaStepper {
    /// Args: attention shape and RMSNorm eps; `inv_freq` (head_dim / 2,) float32; `embed` and
    /// `head` linear tuples `(array, qtype or None, n, k, bias or None)` (float arrays are
    /// float32 (n, k)); `norm` the final norm; `layers` a list of `(attn_norm, q, k, v, o,
    /// ffn_norm, gate, up, down)`; `k_caches`/`v_caches` one (B, Hk, capacity, D) array per
    /// layer, float32 or float16 (all alike), written in place. With `pack` (the default) the
    /// stepper keeps its own copy of the Q8_0/Q4_0/Q4_1 products' blocks interleaved by 16 rows
    /// ([`Packed`]).
    #[new]
    #[pyo3(signature = (n_head, n_kv_head, head_dim, eps, inv_freq, embed, norm, head, layers, k_caches, v_caches, pack=true))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        n_head: usize,
        n_kv_head: usize,
        head_dim: usize,
        eps: f32,
        inv_freq: Vec<f32>,
        embed: &Bound<'_, PyAny>,
        norm: &Bound<'_, PyAny>,
        head: &Bound<'_, PyAny>,
        layers: Vec<Bound<'_, PyAny>>,
        k_caches: Vec<Bound<'_, PyAny>>,
        v_caches: Vec<Bound<'_, PyAny>>,
        pack: bool,
    ) -> PyResult<Self> {
        let mut keep = Vec::new();
        let embed = lin_desc(&mut keep, "embedding", embed)?;
        let head = lin_desc(&mut keep, "head", head)?;
        let norm = f32_array(&mut keep, "norm", norm)?;
        let mut descs = Vec::with_capacity(layers.len());
        for (i, l) in layers.iter().enumerate() {
            let parts: Vec<Bound<'_, PyAny>> = l.extract().map_err(|_| {
                PyTypeError::new_err(format!("layer {i}: expected a tuple of 9 parts"))
            })?;
            if parts.len() != 9 {
                return Err(PyValueError::new_err(format!(
                    "layer {i}: expected 9 parts, got {}",
                    parts.len()
                )));
            }
            let names =
                ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
            let idx = [1, 2, 3, 4, 6, 7, 8];
            let mut lin = Vec::with_capacity(7);
            for (nm, j) in names.iter().zip(idx) {
                lin.push(lin_desc(&mut keep, &format!("layer {i} {nm}"), &parts[j])?);
            }
            let lin: [LinDesc; 7] =
                lin.try_into().map_err(|_| PyValueError::new_err("internal"))?;
            descs.push(LayerDesc {
                attn_norm: f32_array(&mut keep, &format!("layer {i} input_layernorm"), &parts[0])?,
                lin,
                ffn_norm: f32_array(
                    &mut keep,
                    &format!("layer {i} post_attention_layernorm"),
                    &parts[5],
                )?,
            });
        }
        if k_caches.len() != descs.len() || v_caches.len() != descs.len() {
            return Err(PyValueError::new_err(format!(
                "{} layers but {} key and {} value caches",
                descs.len(),
                k_caches.len(),
                v_caches.len()
            )));
        }
        let mut dims = None;
        let f16 = k_caches.first().is_some_and(|c| {
            c.cast::<PyUntypedArray>()
                .is_ok_and(|a| a.dtype().is_equiv_to(&numpy::dtype::<half::f16>(c.py())))
        });
        let (mut k32, mut v32, mut k16, mut v16) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let kv_shape = (n_kv_head, head_dim);
        for (i, (kc, vc)) in k_caches.iter().zip(&v_caches).enumerate() {
            for (name, c, keys) in [("key", kc, true), ("value", vc, false)] {
                let what = format!("layer {i} {name}");
                if f16 {
                    let p = cache_ptr::<half::f16>(c, &what, kv_shape, &mut dims)?;
                    if keys {
                        k16.push(p)
                    } else {
                        v16.push(p)
                    }
                } else {
                    let p = cache_ptr::<f32>(c, &what, kv_shape, &mut dims)?;
                    if keys {
                        k32.push(p)
                    } else {
                        v32.push(p)
                    }
                }
                keep.push(c.clone().unbind());
            }
        }
        let kv = if f16 { KvPtrs::F16(k16, v16) } else { KvPtrs::F32(k32, v32) };
        let (batch, capacity) = dims.unwrap_or((0, 0));
        let mut s = LlamaStepper {
            keep,
            vocab: head.n,
            embed,
            head,
            norm,
            layers: descs,
            n_head,
            n_kv_head,
            head_dim,
            eps,
            inv_freq,
            kv,
            batch,
            capacity,
        };
        s.model().check().map_err(PyValueError::new_err)?;
        // The shapes are checked: interleave the blocks the batch-1 kernels read (the
        // embedding keeps GGUF's rows, which its lookups dequantize one at a time).
        let descs = s.layers.iter_mut().flat_map(|l| l.lin.iter_mut()).chain([&mut s.head]);
        for d in descs {
            match (pack, d.qt, &d.packed) {
                (false, _, _) => d.packed = None,
                (true, Some(qt), None) => {
                    // SAFETY: `ptr`/`len` describe a u8 array kept alive in `keep`.
                    let w = unsafe { std::slice::from_raw_parts(d.ptr, d.len) };
                    if let Some(p) = py.detach(|| Packed::new(qt, w, d.n, d.k)) {
                        d.packed = Some(Py::new(py, QuantPacked(p))?);
                    }
                }
                _ => {}
            }
        }
        Ok(s)
    }

    /// One token per row (`tokens[b]` at position `positions[b]`, the row's cache length) ->
    /// logits (len(tokens), vocab) float32.
    #[pyo3(signature = (tokens, positions, threads, isa=None))]
    fn step<'py>(
        &self,
        py: Python<'py>,
        tokens: Vec<i64>,
        positions: Vec<i64>,
        threads: usize,
        isa: Option<&str>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let path = self::isa(isa)?;
        let b = tokens.len();
        if b == 0 {
            return Err(PyValueError::new_err(
                "step needs at least one row: got 0 tokens (expected 1 to the cache's rows)",
            ));
        }
        if positions.len() != b || b > self.batch {
            return Err(PyValueError::new_err(format!(
                "{b} tokens and {} positions for a cache of {} rows",
                positions.len(),
                self.batch
            )));
        }
        let embed_rows = self.embed.n;
        let mut toks = Vec::with_capacity(b);
        for &t in &tokens {
            if t < 0 || t as usize >= embed_rows {
                return Err(PyValueError::new_err(format!(
                    "token id {t} is out of range for {embed_rows} embeddings"
                )));
            }
            toks.push(t as usize);
        }
        let mut pos = Vec::with_capacity(b);
        for &p in &positions {
            if p < 0 || p as usize >= self.capacity {
                return Err(PyValueError::new_err(format!(
                    "position {p} is outside the KV cache of {} positions",
                    self.capacity
                )));
            }
            pos.push(p as usize);
        }
        let threads = parallel::resolve_threads(Some(threads));
        let out = match &self.kv {
            KvPtrs::F32(k, v) => self.run(py, k, v, &toks, &pos, path, threads),
            KvPtrs::F16(k, v) => self.run(py, k, v, &toks, &pos, path, threads),
        };
        to2(py, out, b, self.vocab)
    }
}

impl LlamaStepper {
    /// [`engine::step`] over caches of element type `E`, with the GIL released.
    #[allow(clippy::too_many_arguments)]
    fn run<E: KvElem<f32>>(
        &self,
        py: Python<'_>,
        k: &[*mut E],
        v: &[*mut E],
        toks: &[usize],
        pos: &[usize],
        path: Isa,
        threads: usize,
    ) -> Vec<f32> {
        let cache = engine::Cache {
            k: k.iter().map(|&p| team::Shared(p)).collect(),
            v: v.iter().map(|&p| team::Shared(p)).collect(),
            batch: self.batch,
            capacity: self.capacity,
        };
        let model = self.model();
        let (b, vocab) = (toks.len(), self.vocab);
        let _alive = &self.keep;
        let views = SendPtr(&model, &cache);
        py.detach(move || {
            let SendPtr(model, cache) = views;
            let mut out = vec![0f32; b * vocab];
            engine::step(model, cache, toks, pos, path, threads, &mut out);
            out
        })
    }
}

/// The model and cache views cross into the GIL-free closure: they point into arrays that
/// `self.keep` holds, and nothing else runs on this (unsendable) stepper meanwhile.
struct SendPtr<'a, E>(&'a engine::Model<'a>, &'a engine::Cache<E>);
// SAFETY: see the type's comment; the views are only read (weights) or written through the
// cache pointers, by this call alone.
unsafe impl<E> Send for SendPtr<'_, E> {}
