//! LSTM and GRU layers (one direction) over packed variable-length batches, forward and
//! backward through time, with torch's parameter layout and gate order.
//!
//! Layout: sequences sorted by length, longest first; step t holds `batch_sizes[t]` rows (the
//! sequences still running), stored back to back ("packed", as torch's PackedSequence), so
//! every row computed is a real token. Row j of step t belongs to sequence j.
//!
//! Forward: the input rows are projected through `W_ih` (biases as the initial value) a chunk
//! of >= 64 rows at a time inside the step loop (f32 with up to 256 active rows, where that
//! loop keeps only a chunk of gate rows and no cell states for inference; one GEMM up front
//! otherwise); each step adds `h_{t-1} · W_hhᵀ` for its active rows and applies the gates and
//! the state update in one pass. Inference can read and write batch-first rows (sequences of
//! one length). Backward: only the sequential part runs here (the gate gradients and
//! `dh_{t-1} = dgates_t · W_hh`); it returns the gate gradients and every row's previous hidden
//! state, and the caller forms `dX`, `dW_ih`, `dW_hh` and the biases with its own GEMM.

use std::any::TypeId;

use super::simd::{GruRow, LstmRow};
use super::smallmm::{self, Lhs, Packed};
use super::team::{self, Shared};
use super::{matmul, zeroed, Float, Mat};
use crate::{Error, Result};

/// Active batches up to this size use the pre-packed kernel for the recurrent product (f32):
/// the `gemm` crate re-packs the weight every step (measurements in docs/kernels.md).
const PACKED_MAX_M: usize = 256;

/// The right-hand side of the per-step recurrent product: packed once per call for f32 small
/// batches, else a plain view for the general GEMM.
enum StepB<T> {
    Packed(Packed),
    Plain(Mat<T>),
}

impl<T: Float> StepB<T> {
    fn new(b: Mat<T>, max_rows: usize) -> Self {
        if TypeId::of::<T>() == TypeId::of::<f32>() && max_rows <= PACKED_MAX_M {
            // T is f32 (checked), so the view's element type is f32.
            let b32 =
                Mat { ptr: b.ptr as *const f32, rows: b.rows, cols: b.cols, rs: b.rs, cs: b.cs };
            StepB::Packed(Packed::new(b32))
        } else {
            StepB::Plain(b)
        }
    }

    /// Whether a team of threads can split the per-step product (packed path only).
    fn splittable(&self) -> bool {
        matches!(self, StepB::Packed(_))
    }

    /// `dst[rows x N] (+)= A[rows x K] · B`, whole.
    fn mm(&self, dst: &mut [T], ldd: usize, lhs: Lhs<'_, T>, accumulate: bool, threads: usize) {
        let Lhs { a, lda, m: rows } = lhs;
        match self {
            StepB::Packed(p) => {
                assert!(
                    rows == 0 || dst.len() >= (rows - 1) * ldd + p.cols(),
                    "destination out of bounds"
                );
                // SAFETY: bounds checked above; `dst` is exclusively borrowed; all panels.
                unsafe { self.mm_part(dst.as_mut_ptr(), ldd, lhs, accumulate, (0, 1)) }
                let _ = p;
            }
            StepB::Plain(b) => {
                let k = b.rows;
                let av = Mat { ptr: a.as_ptr(), rows, cols: k, rs: lda as isize, cs: 1 };
                assert!(
                    a.len() >= if rows == 0 { 0 } else { (rows - 1) * lda + k },
                    "lhs out of bounds"
                );
                matmul(dst, ldd, av, *b, accumulate, threads);
            }
        }
    }

    /// The share `(tid, n)` of the packed product's 16-column panels, through a raw pointer.
    ///
    /// # Safety
    /// `dst` must be valid for `(rows - 1) * ldd + N` elements and no other thread may touch
    /// this share's columns of those rows meanwhile; only for a `Packed` right-hand side.
    unsafe fn mm_part(
        &self,
        dst: *mut T,
        ldd: usize,
        lhs: Lhs<'_, T>,
        accumulate: bool,
        part: (usize, usize),
    ) {
        let StepB::Packed(p) = self else { unreachable!("mm_part needs a packed right-hand side") };
        // T is f32 whenever a Packed exists (see `new`).
        let panels = super::team::share(p.panels(), part.0, part.1, 1);
        smallmm::mm_raw(dst as *mut f32, ldd, lhs.f32(), p, accumulate, panels);
    }
}

/// `dst[rows x N] = A[rows x K] · b`, the forward's input projection over all
/// rows: in f32 through the packed kernel with the rows split over a thread team (it has
/// AVX-512 where the CPU does, unlike the `gemm` crate on stable Rust), else the general GEMM.
fn big_mm<T: Float>(dst: &mut [T], ldd: usize, lhs: Lhs<'_, T>, b: Mat<T>, threads: usize) {
    let (Lhs { a, lda, m: rows }, k) = (lhs, b.rows);
    if rows == 0 {
        return;
    }
    assert!(lda >= k && a.len() >= (rows - 1) * lda + k, "big_mm lhs out of bounds");
    if TypeId::of::<T>() != TypeId::of::<f32>() {
        let av = Mat { ptr: a.as_ptr(), rows, cols: k, rs: lda as isize, cs: 1 };
        matmul(dst, ldd, av, b, false, threads);
        return;
    }
    let StepB::Packed(p) = StepB::new(b, 0) else { unreachable!("f32 packs") };
    assert!(dst.len() >= (rows - 1) * ldd + p.cols(), "big_mm out of bounds");
    let a32 = lhs.f32().a; // T is f32 (checked above)
    let dp = Shared(dst.as_mut_ptr() as *mut f32);
    let nt = if rows * k * p.cols() >= (1 << 20) {
        threads.clamp(1, crate::parallel::available_threads())
    } else {
        1
    };
    // Long inner dimensions are cut into blocks of KB so a panel pair's slice (KB x 32 floats)
    // stays in L2 while every row tile passes over it.
    const KB: usize = 512;
    team::run(nt, |tid, _| {
        let (r0, r1) = team::share(rows, tid, nt, 8);
        if r1 > r0 {
            for kb in (0..k).step_by(KB) {
                // SAFETY: each thread writes only its own rows [r0, r1) of `dst` (bounds
                // checked above) and reads `a` and the packed weights.
                unsafe {
                    smallmm::mm_raw_k(
                        dp.ptr().add(r0 * ldd),
                        ldd,
                        Lhs { a: &a32[r0 * lda..], lda, m: r1 - r0 },
                        &p,
                        kb > 0,
                        (0, usize::MAX),
                        (kb, (kb + KB).min(k)),
                    );
                }
            }
        }
    });
}

/// Row stride of a gate-gradient buffer `g` wide: 16 floats more when its rows would be a
/// multiple of 1 KiB apart, since the weight gradients read it down its columns and rows that
/// far apart all fall in one L1 set.
fn grad_stride(g: usize) -> usize {
    if g.is_multiple_of(256) {
        g + 16
    } else {
        g
    }
}

/// Threads for a layer's step loop: a team only when the packed product is used and the
/// recurrent work is large enough to pay for starting a thread (~30 µs).
/// Never more threads than hardware threads: spin barriers with more threads than cores stall.
fn team_size<T: Float>(b: &StepB<T>, threads: usize, steps: usize, step_macs: usize) -> usize {
    let threads = threads.min(crate::parallel::available_threads());
    if b.splittable() && threads > 1 && steps * step_macs >= (1 << 22) {
        threads
    } else {
        1
    }
}

/// Sizes of one layer direction.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub input: usize,
    pub hidden: usize,
}

/// Row offsets of each step, and the total row count.
fn offsets(batch_sizes: &[usize]) -> Result<(Vec<usize>, usize)> {
    if batch_sizes.is_empty() || batch_sizes[0] == 0 {
        return Err(Error::value("batch_sizes must be non-empty and start with a positive count"));
    }
    if batch_sizes.windows(2).any(|w| w[1] > w[0]) {
        return Err(Error::value(
            "batch_sizes must be non-increasing (sequences sorted by length, longest first)",
        ));
    }
    let mut off = Vec::with_capacity(batch_sizes.len());
    let mut n = 0;
    for &b in batch_sizes {
        off.push(n);
        n += b;
    }
    Ok((off, n))
}

fn check_len<T>(name: &str, s: &[T], want: usize) -> Result<()> {
    if s.len() != want {
        return Err(Error::value(format!("{name} has {} elements, expected {want}", s.len())));
    }
    Ok(())
}

/// The steps in processing order.
fn order(t_len: usize, reverse: bool) -> Box<dyn Iterator<Item = usize>> {
    if reverse {
        Box::new((0..t_len).rev())
    } else {
        Box::new(0..t_len)
    }
}

/// The row holding sequence j's previous step (in processing order) before step t, if any.
#[inline]
fn prev_row(
    t: usize,
    j: usize,
    reverse: bool,
    batch_sizes: &[usize],
    off: &[usize],
) -> Option<usize> {
    if reverse {
        (t + 1 < batch_sizes.len() && j < batch_sizes[t + 1]).then(|| off[t + 1] + j)
    } else {
        (t > 0).then(|| off[t - 1] + j)
    }
}

/// One layer direction: its sizes and its weights in torch's layout (gates stacked along rows).
pub struct Layer<'a, T> {
    pub dims: Dims,
    pub w_ih: &'a [T],
    pub w_hh: &'a [T],
    pub b_ih: Option<&'a [T]>,
    pub b_hh: Option<&'a [T]>,
}

impl<T: Float> Layer<'_, T> {
    fn check(&self, gates: usize) -> Result<()> {
        let d = self.dims;
        check_len("weight_ih", self.w_ih, gates * d.hidden * d.input)?;
        check_len("weight_hh", self.w_hh, gates * d.hidden * d.hidden)?;
        if let Some(b) = self.b_ih {
            check_len("bias_ih", b, gates * d.hidden)?;
        }
        if let Some(b) = self.b_hh {
            check_len("bias_hh", b, gates * d.hidden)?;
        }
        Ok(())
    }
}

/// A packed input sequence: rows `x` (N, I), `batch_sizes[t]` of them at step t (see the
/// module doc), run from the last step to the first when `reverse`.
#[derive(Clone, Copy)]
pub struct Input<'a, T> {
    pub x: &'a [T],
    pub batch_sizes: &'a [usize],
    pub reverse: bool,
}

/// An LSTM's initial state: `h0` and `c0`, (B, H) each.
#[derive(Clone, Copy)]
pub struct State<'a, T> {
    pub h0: &'a [T],
    pub c0: &'a [T],
}

/// How a forward runs: `keep` the gate activations and cell states for a backward (false for
/// inference), read `x` and write `y` in `batch_first` row order (inference over sequences of
/// one length), on up to `threads` threads.
#[derive(Debug, Clone, Copy)]
pub struct ForwardOptions {
    pub keep: bool,
    pub batch_first: bool,
    pub threads: usize,
}

/// The gradients of the loss with respect to the layer's outputs: `dy` (N, H), `dh_n` (B, H)
/// and `dc_n` (B, H; LSTM only, empty for the GRU).
#[derive(Clone, Copy)]
pub struct OutputGrads<'a, T> {
    pub dy: &'a [T],
    pub dh_n: &'a [T],
    pub dc_n: &'a [T],
}

/// What an LSTM forward returns, and keeps for the backward.
pub struct LstmOut<T> {
    /// (N, H) outputs.
    pub y: Vec<T>,
    /// (B, H) final states.
    pub h_n: Vec<T>,
    pub c_n: Vec<T>,
    /// (N, 4H) gate activations i, f, g, o.
    pub gates: Vec<T>,
    /// (N, H) cell states.
    pub cs: Vec<T>,
}

/// What the backward reads from the forward: outputs `y` (N, H), gate activations, and the
/// per-row cell states (LSTM) or recurrent candidate parts `W_hn h + b_hn` (GRU), (N, H).
#[derive(Clone, Copy)]
pub struct Saved<'a, T> {
    pub y: &'a [T],
    pub gates: &'a [T],
    pub cs: &'a [T],
}

/// What the backward through time returns for one layer direction. The caller forms the rest
/// with its own GEMM: `dx = dgx W_ih`, `dW_ih = dgxᵀ x`, `dW_hh = dghᵀ hprev`, and the bias
/// gradients as the column sums of `dgx` and `dgh`.
pub struct Grads<T> {
    /// (B, H) gradient of the initial hidden state.
    pub dh0: Vec<T>,
    /// (B, H) gradient of the initial cell state: LSTM only (empty for GRU).
    pub dc0: Vec<T>,
    /// The gradient of the input-side pre-activations (N, G*H), of the recurrent-side ones
    /// (GRU only; empty for the LSTM, whose are `dgx`), and the previous hidden state of every
    /// row (N, H).
    pub dgx: Vec<T>,
    pub dgh: Vec<T>,
    pub hprev: Vec<T>,
    /// Row stride of `dgx` / `dgh` (the gate width, padded: see `grad_stride`).
    pub ldg: usize,
}

fn add_bias<T: Float>(rows: &mut [T], width: usize, a: Option<&[T]>, b: Option<&[T]>) {
    let bias: Option<Vec<T>> = match (a, b) {
        (None, None) => None,
        (Some(a), None) => Some(a.to_vec()),
        (None, Some(b)) => Some(b.to_vec()),
        (Some(a), Some(b)) => Some(a.iter().zip(b).map(|(&x, &y)| x + y).collect()),
    };
    if let Some(bias) = bias {
        for r in rows.chunks_exact_mut(width) {
            for (v, &b) in r.iter_mut().zip(&bias) {
                *v += b;
            }
        }
    }
}

/// LSTM forward over packed rows `x` (N, I). With `keep` false (inference: nothing will be
/// differentiated) the gate activations and cell states are not kept: `gates` and `cs` come
/// back empty and the f32 path needs only a chunk's worth of gate rows. With `batch_first`
/// (inference only, every sequence the same length) `x` is `(B, T, I)` and `y` comes back
/// `(B, T, H)`, both contiguous: no transposed copies around the call.
pub fn lstm_forward<T: Float>(
    w: &Layer<'_, T>,
    input: Input<'_, T>,
    init: State<'_, T>,
    opts: ForwardOptions,
) -> Result<LstmOut<T>> {
    let (Input { x, batch_sizes, reverse }, State { h0, c0 }) = (input, init);
    let ForwardOptions { keep, batch_first, threads } = opts;
    let d = w.dims;
    let (off, n) = offsets(batch_sizes)?;
    let (h, b) = (d.hidden, batch_sizes[0]);
    check_len("input", x, n * d.input)?;
    check_len("h0", h0, b * h)?;
    check_len("c0", c0, b * h)?;
    w.check(4)?;
    check_batch_first(batch_first, keep, batch_sizes)?;
    let g4 = 4 * h;
    let whh_t = StepB::new(Mat::rm(w.w_hh, g4, h).t(), b);
    if whh_t.splittable() {
        return Ok(lstm_forward_chunked(w, input, &off, init, &whh_t, opts));
    }
    if batch_first {
        let xp = reorder_rows(x, d.input, b, batch_sizes.len(), false);
        let step_major = ForwardOptions { batch_first: false, ..opts };
        let mut o = lstm_forward(w, Input { x: &xp, ..input }, init, step_major)?;
        o.y = reorder_rows(&o.y, h, b, batch_sizes.len(), true);
        return Ok(o);
    }
    let mut gates = zeroed(n * g4);
    big_mm(
        &mut gates,
        g4,
        Lhs { a: x, lda: d.input, m: n },
        Mat::rm(w.w_ih, g4, d.input).t(),
        threads,
    );
    add_bias(&mut gates, g4, w.b_ih, w.b_hh);
    let mut hs = h0.to_vec();
    let mut cst = c0.to_vec();
    let mut y = zeroed(n * h);
    let mut cs = zeroed(n * h);
    let nt = team_size(&whh_t, threads, batch_sizes.len(), b * g4 * h);
    let (gp, hp, cp, yp, csp) = (
        Shared(gates.as_mut_ptr()),
        Shared(hs.as_mut_ptr()),
        Shared(cst.as_mut_ptr()),
        Shared(y.as_mut_ptr()),
        Shared(cs.as_mut_ptr()),
    );
    team::run(nt, |tid, bar| {
        let (u0, u1) = team::share(h, tid, nt, 16);
        let len = u1 - u0;
        for t in order(batch_sizes.len(), reverse) {
            let (bs, o) = (batch_sizes[t], off[t]);
            // SAFETY (whole block): every thread reads `hs` only in phase 1 and writes only its
            // own units [u0, u1) of `hs`, `cst`, `y`, `cs` and of each gate block of `gates` in
            // phase 2; phase 1 writes only its own panels' columns of the step's gate rows.
            // The two barriers separate the phases; all ranges lie inside the buffers.
            unsafe {
                let hs_read: &[T] = std::slice::from_raw_parts(hp.ptr(), bs * h);
                if nt > 1 {
                    whh_t.mm_part(
                        gp.ptr().add(o * g4),
                        g4,
                        Lhs { a: hs_read, lda: h, m: bs },
                        true,
                        (tid, nt),
                    );
                } else {
                    whh_t.mm(
                        gp.slice(o * g4, bs * g4),
                        g4,
                        Lhs { a: hs_read, lda: h, m: bs },
                        true,
                        threads,
                    );
                }
                bar.wait();
                for j in 0..bs {
                    let r = o + j;
                    let row = LstmRow {
                        i: gp.slice(r * g4 + u0, len),
                        f: gp.slice(r * g4 + h + u0, len),
                        g: gp.slice(r * g4 + 2 * h + u0, len),
                        o: gp.slice(r * g4 + 3 * h + u0, len),
                    };
                    T::lstm_cell(
                        row,
                        cp.slice(j * h + u0, len),
                        hp.slice(j * h + u0, len),
                        csp.slice(r * h + u0, len),
                        yp.slice(r * h + u0, len),
                    );
                }
                bar.wait();
            }
        }
    });
    if !keep {
        return Ok(LstmOut { y, h_n: hs, c_n: cst, gates: Vec::new(), cs: Vec::new() });
    }
    Ok(LstmOut { y, h_n: hs, c_n: cst, gates, cs })
}

/// The batch-first layout is for inference over sequences of one length.
fn check_batch_first(batch_first: bool, keep: bool, batch_sizes: &[usize]) -> Result<()> {
    if batch_first && keep {
        return Err(Error::value("the batch-first layout is for inference only (keep=false)"));
    }
    if batch_first && batch_sizes.iter().any(|&s| s != batch_sizes[0]) {
        return Err(Error::value(
            "the batch-first layout needs every sequence to have the same length",
        ));
    }
    Ok(())
}

/// Row `r` (step-major packed order, `b` rows a step) of a batch-first `(b, steps, .)` array.
#[inline(always)]
fn bf_row(r: usize, b: usize, steps: usize) -> usize {
    (r % b) * steps + r / b
}

/// Rows of width `w` from batch-first to step-major order (or back, `to_bf`).
fn reorder_rows<T: Float>(v: &[T], w: usize, b: usize, steps: usize, to_bf: bool) -> Vec<T> {
    let mut out: Vec<T> = zeroed(v.len());
    for r in 0..b * steps {
        let q = bf_row(r, b, steps);
        let (dst, src) = if to_bf { (q, r) } else { (r, q) };
        out[dst * w..(dst + 1) * w].copy_from_slice(&v[src * w..(src + 1) * w]);
    }
    out
}

/// Gate rows projected at a time on the chunked path: the chunk's rows (x · W_ihᵀ + biases)
/// are computed by the step loop's own team right before its steps, each thread its own gate
/// columns (the recurrent product's share), so the step product accumulates into rows still in
/// L2 and inference needs no N x 4H buffer.
const CHUNK_ROWS: usize = 64;

/// The f32 step loop with the input projection done in chunks inside it (see [`CHUNK_ROWS`]),
/// so the step product reads gate rows still in L2 rather than a buffer of all N rows from
/// DRAM (measured in docs/kernels.md).
fn lstm_forward_chunked<T: Float>(
    w: &Layer<'_, T>,
    input: Input<'_, T>,
    off: &[usize],
    init: State<'_, T>,
    whh_t: &StepB<T>,
    opts: ForwardOptions,
) -> LstmOut<T> {
    let (Input { x, batch_sizes, reverse }, State { h0, c0 }) = (input, init);
    let ForwardOptions { keep, batch_first, threads } = opts;
    let d = w.dims;
    let (h, b, steps) = (d.hidden, batch_sizes[0], batch_sizes.len());
    let n = off[steps - 1] + batch_sizes[steps - 1];
    let g4 = 4 * h;
    let wih_t = StepB::new(Mat::rm(w.w_ih, g4, d.input).t(), 0);
    debug_assert!(wih_t.splittable());
    let bias = sum_bias(w.b_ih, w.b_hh, g4);
    let (order, chunks, max_rows) = chunk_plan(batch_sizes, off, reverse);
    let mut gates: Vec<T> = zeroed(if keep { n * g4 } else { max_rows * g4 });
    let mut cs: Vec<T> = zeroed(if keep { n * h } else { max_rows * h });
    let mut hs = h0.to_vec();
    let mut cst = c0.to_vec();
    let mut y = zeroed(n * h);
    let nt = team_size(whh_t, threads, steps, b * g4 * (h + d.input));
    let (gp, hp, cp, yp, csp) = (
        Shared(gates.as_mut_ptr()),
        Shared(hs.as_mut_ptr()),
        Shared(cst.as_mut_ptr()),
        Shared(y.as_mut_ptr()),
        Shared(cs.as_mut_ptr()),
    );
    team::run(nt, |tid, bar| {
        let (u0, u1) = team::share(h, tid, nt, 16);
        let len = u1 - u0;
        let mut xs: Vec<T> = Vec::new(); // this thread's copy of a batch-first chunk
        let cols = own_columns(g4, tid, nt);
        for &(c, (r0, r1)) in &chunks {
            // Row `r` of the chunk lives at `base + (r - r0)` of the gate (and cell) buffers.
            let base = if keep { r0 } else { 0 };
            // SAFETY (whole block): the projection writes only this thread's gate columns
            // `cols` of the chunk's rows; the step product only this thread's columns of
            // the step's rows; between the barriers each thread writes only its units [u0, u1)
            // of `hs`, `cst`, `y`, `cs` and of each gate block. The chunk's first projection
            // comes after the previous chunk's last barrier, so no cell still reads the rows it
            // overwrites; all ranges lie inside the buffers (sized above).
            unsafe {
                let xrows =
                    chunk_input(x, d.input, (r0, r1), batch_first.then_some((b, steps)), &mut xs);
                project_chunk(
                    gp.ptr().add(base * g4),
                    g4,
                    &wih_t,
                    bias.as_deref(),
                    cols,
                    Lhs { a: xrows, lda: d.input, m: r1 - r0 },
                    (tid, nt),
                );
                for &t in &order[c.0..c.1] {
                    let (bs, o) = (batch_sizes[t], off[t]);
                    let lr = base + o - r0; // the step's first row in the buffers
                    let hs_read: &[T] = std::slice::from_raw_parts(hp.ptr(), bs * h);
                    whh_t.mm_part(
                        gp.ptr().add(lr * g4),
                        g4,
                        Lhs { a: hs_read, lda: h, m: bs },
                        true,
                        (tid, nt),
                    );
                    bar.wait();
                    for j in 0..bs {
                        let r = lr + j;
                        let row = LstmRow {
                            i: gp.slice(r * g4 + u0, len),
                            f: gp.slice(r * g4 + h + u0, len),
                            g: gp.slice(r * g4 + 2 * h + u0, len),
                            o: gp.slice(r * g4 + 3 * h + u0, len),
                        };
                        let yr = if batch_first { bf_row(o + j, b, steps) } else { o + j };
                        T::lstm_cell(
                            row,
                            cp.slice(j * h + u0, len),
                            hp.slice(j * h + u0, len),
                            csp.slice(r * h + u0, len),
                            yp.slice(yr * h + u0, len),
                        );
                    }
                    bar.wait();
                }
            }
        }
    });
    if !keep {
        return LstmOut { y, h_n: hs, c_n: cst, gates: Vec::new(), cs: Vec::new() };
    }
    LstmOut { y, h_n: hs, c_n: cst, gates, cs }
}

/// LSTM backward through time for one layer direction given the forward's saved values: `dgx`
/// (= `dgh`), `hprev`, `dh0` and `dc0` (see [`Grads`]).
pub fn lstm_backward<T: Float>(
    w: &Layer<'_, T>,
    input: Input<'_, T>,
    init: State<'_, T>,
    saved: Saved<'_, T>,
    grads: OutputGrads<'_, T>,
    threads: usize,
) -> Result<Grads<T>> {
    let (Input { x, batch_sizes, reverse }, State { h0, c0 }) = (input, init);
    let OutputGrads { dy, dh_n, dc_n } = grads;
    let d = w.dims;
    let fwd = saved;
    let (off, n) = offsets(batch_sizes)?;
    let (h, b) = (d.hidden, batch_sizes[0]);
    check_len("grad_output", dy, n * h)?;
    check_len("grad_h_n", dh_n, b * h)?;
    check_len("grad_c_n", dc_n, b * h)?;
    check_len("saved outputs", fwd.y, n * h)?;
    check_len("saved gates", fwd.gates, n * 4 * h)?;
    check_len("saved cell states", fwd.cs, n * h)?;
    w.check(4)?;
    check_len("input", x, n * d.input)?;
    check_len("h0", h0, b * h)?;
    check_len("c0", c0, b * h)?;
    let g4 = 4 * h;
    let ldg = grad_stride(g4);
    let mut dgates = zeroed(n * ldg);
    let mut hprev = zeroed(n * h);
    let mut dh = dh_n.to_vec();
    let mut dc = dc_n.to_vec();
    let whh = StepB::new(Mat::rm(w.w_hh, g4, h), b);
    let nt = team_size(&whh, threads, batch_sizes.len(), b * g4 * h);
    let one = T::ONE;
    let mut tanh_c = zeroed(b * h);
    let (dgp, hpp, dhp, dcp, tcp) = (
        Shared(dgates.as_mut_ptr()),
        Shared(hprev.as_mut_ptr()),
        Shared(dh.as_mut_ptr()),
        Shared(dc.as_mut_ptr()),
        Shared(tanh_c.as_mut_ptr()),
    );
    team::run(nt, |tid, bar| {
        let (u0, u1) = team::share(h, tid, nt, 16);
        let len = u1 - u0;
        for t in order(batch_sizes.len(), !reverse) {
            let (bs, o) = (batch_sizes[t], off[t]);
            // SAFETY (whole block): phase 1 writes only this thread's units [u0, u1) of `dh`,
            // `dc`, `tanh_c`, `hprev` and of each gate block of the step's `dgates` rows;
            // phase 2 reads the step's `dgates` rows (complete after the barrier) and writes
            // only this thread's columns [u0, u1) of `dh` (panel share == unit share: both
            // split H in 16-wide blocks). The next phase 1 touches other `dgates` rows and
            // only its own units, so one barrier per step suffices.
            unsafe {
                for j in 0..bs {
                    let row = o + j;
                    let tc = tcp.slice(j * h + u0, len);
                    T::tanh_slice(&fwd.cs[row * h + u0..row * h + u1], tc);
                    let p = prev_row(t, j, reverse, batch_sizes, &off);
                    let c_prev = match p {
                        Some(r) => &fwd.cs[r * h + u0..r * h + u1],
                        None => &c0[j * h + u0..j * h + u1],
                    };
                    let h_prev = match p {
                        Some(r) => &fwd.y[r * h + u0..r * h + u1],
                        None => &h0[j * h + u0..j * h + u1],
                    };
                    hpp.slice(row * h + u0, len).copy_from_slice(h_prev);
                    let gr = &fwd.gates[row * g4..(row + 1) * g4];
                    let dyr = &dy[row * h + u0..row * h + u1];
                    let (dhr, dcr) = (dhp.slice(j * h + u0, len), dcp.slice(j * h + u0, len));
                    let (di, df, dgg, dgo) = (
                        dgp.slice(row * ldg + u0, len),
                        dgp.slice(row * ldg + h + u0, len),
                        dgp.slice(row * ldg + 2 * h + u0, len),
                        dgp.slice(row * ldg + 3 * h + u0, len),
                    );
                    for q in 0..len {
                        let k = u0 + q;
                        let (i, f, gg, og) = (gr[k], gr[h + k], gr[2 * h + k], gr[3 * h + k]);
                        let dhv = dhr[q] + dyr[q];
                        let tcv = tc[q];
                        let d_o = dhv * tcv;
                        let dcv = dcr[q] + dhv * og * (one - tcv * tcv);
                        di[q] = dcv * gg * i * (one - i);
                        df[q] = dcv * c_prev[q] * f * (one - f);
                        dgg[q] = dcv * i * (one - gg * gg);
                        dgo[q] = d_o * og * (one - og);
                        dcr[q] = dcv * f;
                    }
                }
                bar.wait();
                let dg_read: &[T] =
                    std::slice::from_raw_parts(dgp.ptr().add(o * ldg), (bs - 1) * ldg + g4);
                if nt > 1 {
                    whh.mm_part(
                        dhp.ptr(),
                        h,
                        Lhs { a: dg_read, lda: ldg, m: bs },
                        false,
                        (tid, nt),
                    );
                } else {
                    whh.mm(
                        dhp.slice(0, bs * h),
                        h,
                        Lhs { a: dg_read, lda: ldg, m: bs },
                        false,
                        threads,
                    );
                }
            }
        }
    });
    Ok(Grads { dh0: dh, dc0: dc, dgx: dgates, dgh: Vec::new(), hprev, ldg })
}

/// What a GRU forward returns, and keeps for the backward.
pub struct GruOut<T> {
    /// (N, H) outputs.
    pub y: Vec<T>,
    /// (B, H) final state.
    pub h_n: Vec<T>,
    /// (N, 3H) gate activations r, z, n.
    pub gates: Vec<T>,
    /// (N, H) the recurrent part of the candidate, `W_hn h + b_hn`.
    pub hn: Vec<T>,
}

/// GRU forward over packed rows (torch's formulation: the reset gate multiplies
/// `W_hn h + b_hn`, so all three recurrent gates come from one product). With `keep` false
/// (inference) `gates` and `hn` come back empty, as for [`lstm_forward`].
pub fn gru_forward<T: Float>(
    w: &Layer<'_, T>,
    input: Input<'_, T>,
    h0: &[T],
    opts: ForwardOptions,
) -> Result<GruOut<T>> {
    let Input { x, batch_sizes, reverse } = input;
    let ForwardOptions { keep, batch_first, threads } = opts;
    let d = w.dims;
    let (off, n) = offsets(batch_sizes)?;
    let (h, b) = (d.hidden, batch_sizes[0]);
    check_len("input", x, n * d.input)?;
    check_len("h0", h0, b * h)?;
    w.check(3)?;
    check_batch_first(batch_first, keep, batch_sizes)?;
    let g3 = 3 * h;
    {
        let whh_t = StepB::new(Mat::rm(w.w_hh, g3, h).t(), b);
        if whh_t.splittable() {
            return Ok(gru_forward_chunked(w, input, &off, h0, &whh_t, opts));
        }
    }
    if batch_first {
        let xp = reorder_rows(x, d.input, b, batch_sizes.len(), false);
        let step_major = ForwardOptions { batch_first: false, ..opts };
        let mut o = gru_forward(w, Input { x: &xp, ..input }, h0, step_major)?;
        o.y = reorder_rows(&o.y, h, b, batch_sizes.len(), true);
        return Ok(o);
    }
    let mut gates = zeroed(n * g3);
    big_mm(
        &mut gates,
        g3,
        Lhs { a: x, lda: d.input, m: n },
        Mat::rm(w.w_ih, g3, d.input).t(),
        threads,
    );
    add_bias(&mut gates, g3, w.b_ih, None);
    let mut hs = h0.to_vec();
    let mut y = zeroed(n * h);
    let mut hn = zeroed(n * h);
    let mut gh = zeroed(b * g3);
    let whh_t = StepB::new(Mat::rm(w.w_hh, g3, h).t(), b);
    let nt = team_size(&whh_t, threads, batch_sizes.len(), b * g3 * h);
    let (gp, ghp, hp, hnp, yp) = (
        Shared(gates.as_mut_ptr()),
        Shared(gh.as_mut_ptr()),
        Shared(hs.as_mut_ptr()),
        Shared(hn.as_mut_ptr()),
        Shared(y.as_mut_ptr()),
    );
    team::run(nt, |tid, bar| {
        let (u0, u1) = team::share(h, tid, nt, 16);
        let len = u1 - u0;
        for t in order(batch_sizes.len(), reverse) {
            let (bs, o) = (batch_sizes[t], off[t]);
            // SAFETY (whole block): phase 1 reads `hs` and writes only this thread's panel
            // columns of `gh`'s first bs rows; after the barrier, phase 2 reads `gh` and writes
            // only this thread's units of `gates` rows, `hs`, `hn` and `y`; the second barrier
            // keeps the next phase 1 (which reads all of `hs`) after it.
            unsafe {
                let hs_read: &[T] = std::slice::from_raw_parts(hp.ptr(), bs * h);
                if nt > 1 {
                    whh_t.mm_part(
                        ghp.ptr(),
                        g3,
                        Lhs { a: hs_read, lda: h, m: bs },
                        false,
                        (tid, nt),
                    );
                } else {
                    whh_t.mm(
                        ghp.slice(0, bs * g3),
                        g3,
                        Lhs { a: hs_read, lda: h, m: bs },
                        false,
                        threads,
                    );
                }
                bar.wait();
                for j in 0..bs {
                    let r = o + j;
                    let ghr = ghp.slice(j * g3, g3);
                    if let Some(bias) = w.b_hh {
                        for q in u0..u1 {
                            ghr[q] += bias[q];
                            ghr[h + q] += bias[h + q];
                            ghr[2 * h + q] += bias[2 * h + q];
                        }
                    }
                    let ghr: &[T] = ghr;
                    let row = GruRow {
                        xr: gp.slice(r * g3 + u0, len),
                        xz: gp.slice(r * g3 + h + u0, len),
                        xn: gp.slice(r * g3 + 2 * h + u0, len),
                        hr: &ghr[u0..u1],
                        hz: &ghr[h + u0..h + u1],
                        hn: &ghr[2 * h + u0..2 * h + u1],
                    };
                    T::gru_cell(
                        row,
                        hp.slice(j * h + u0, len),
                        hnp.slice(r * h + u0, len),
                        yp.slice(r * h + u0, len),
                    );
                }
                bar.wait();
            }
        }
    });
    if !keep {
        return Ok(GruOut { y, h_n: hs, gates: Vec::new(), hn: Vec::new() });
    }
    Ok(GruOut { y, h_n: hs, gates, hn })
}

/// This thread's gate columns `[c0, c1)` of a `g`-wide gate row: its share of the 16-column
/// panels (the same share its recurrent step product computes).
fn own_columns(g: usize, tid: usize, nt: usize) -> (usize, usize) {
    let (pa, pb) = team::share(g.div_ceil(16), tid, nt, 1);
    ((pa * 16).min(g), (pb * 16).min(g))
}

/// A chunk's input projection into this thread's gate columns `cols` of `xrows.m` rows at `dst`
/// (row stride `g`): the biases as the initial value, then `+= xrows · W_ihᵀ`.
///
/// # Safety
/// `dst` must be valid for `rows` rows of stride `g`, and no other thread may touch the columns
/// `cols` of those rows meanwhile; `wih_t` packed (f32).
unsafe fn project_chunk<T: Float>(
    dst: *mut T,
    g: usize,
    wih_t: &StepB<T>,
    bias: Option<&[T]>,
    cols: (usize, usize),
    xrows: Lhs<'_, T>,
    part: (usize, usize),
) {
    let rows = xrows.m;
    if let Some(bias) = bias {
        for r in 0..rows {
            std::slice::from_raw_parts_mut(dst.add(r * g + cols.0), cols.1 - cols.0)
                .copy_from_slice(&bias[cols.0..cols.1]);
        }
    }
    wih_t.mm_part(dst, g, xrows, bias.is_some(), part);
}

/// A chunk's input rows `[r0, r1)` (step-major order) as a contiguous slice: `x` itself, or
/// for a batch-first `x` (`bf` = (batch, steps)) a copy into `scratch` (each thread its own:
/// 64 rows, a few µs against the chunk's projection, and no barrier).
fn chunk_input<'a, T: Float>(
    x: &'a [T],
    width: usize,
    rows: (usize, usize),
    bf: Option<(usize, usize)>,
    scratch: &'a mut Vec<T>,
) -> &'a [T] {
    let (r0, r1) = rows;
    match bf {
        None => &x[r0 * width..r1 * width],
        Some((b, steps)) => {
            scratch.clear();
            for r in r0..r1 {
                let q = bf_row(r, b, steps);
                scratch.extend_from_slice(&x[q * width..(q + 1) * width]);
            }
            scratch
        }
    }
}

/// The steps in processing order, their chunks (see [`chunk_steps`]) and the most rows any
/// chunk holds: what both chunked step loops start from.
#[allow(clippy::type_complexity)]
fn chunk_plan(
    batch_sizes: &[usize],
    off: &[usize],
    reverse: bool,
) -> (Vec<usize>, Vec<((usize, usize), (usize, usize))>, usize) {
    let steps = batch_sizes.len();
    let order: Vec<usize> = if reverse { (0..steps).rev().collect() } else { (0..steps).collect() };
    let chunks = chunk_steps(batch_sizes, off, &order, reverse);
    let max_rows = chunks.iter().map(|&(_, (r0, r1))| r1 - r0).max().unwrap_or(0);
    (order, chunks, max_rows)
}

/// Chunks of consecutive steps (ranges of the processing order `order`) holding at least
/// [`CHUNK_ROWS`] rows each (the last takes the rest), and each chunk's row range (a run of
/// steps' rows is contiguous in either direction).
fn chunk_steps(
    batch_sizes: &[usize],
    off: &[usize],
    order: &[usize],
    reverse: bool,
) -> Vec<((usize, usize), (usize, usize))> {
    let mut chunks = Vec::new();
    let (mut start, mut rows) = (0, 0);
    for (i, &t) in order.iter().enumerate() {
        rows += batch_sizes[t];
        if rows >= CHUNK_ROWS || i + 1 == order.len() {
            let (first, last) = (order[start], order[i]);
            let (lo, hi) = if reverse { (last, first) } else { (first, last) };
            chunks.push(((start, i + 1), (off[lo], off[hi] + batch_sizes[hi])));
            start = i + 1;
            rows = 0;
        }
    }
    chunks
}

/// The summed biases, or None.
fn sum_bias<T: Float>(a: Option<&[T]>, b: Option<&[T]>, width: usize) -> Option<Vec<T>> {
    match (a, b) {
        (None, None) => None,
        (a, b) => Some(
            (0..width).map(|j| a.map_or(T::ZERO, |a| a[j]) + b.map_or(T::ZERO, |b| b[j])).collect(),
        ),
    }
}

/// The GRU's f32 step loop with the input projection in chunks inside it, as
/// [`lstm_forward_chunked`]; the recurrent product starts from `b_hh` (copied into the step's
/// rows) instead of a separate bias pass per unit.
fn gru_forward_chunked<T: Float>(
    w: &Layer<'_, T>,
    input: Input<'_, T>,
    off: &[usize],
    h0: &[T],
    whh_t: &StepB<T>,
    opts: ForwardOptions,
) -> GruOut<T> {
    let Input { x, batch_sizes, reverse } = input;
    let ForwardOptions { keep, batch_first, threads } = opts;
    let d = w.dims;
    let (h, b, steps) = (d.hidden, batch_sizes[0], batch_sizes.len());
    let n = off[steps - 1] + batch_sizes[steps - 1];
    let g3 = 3 * h;
    let wih_t = StepB::new(Mat::rm(w.w_ih, g3, d.input).t(), 0);
    let b_ih = sum_bias(w.b_ih, None, g3);
    let b_hh = sum_bias(w.b_hh, None, g3);
    let (order, chunks, max_rows) = chunk_plan(batch_sizes, off, reverse);
    let mut gates: Vec<T> = zeroed(if keep { n * g3 } else { max_rows * g3 });
    let mut hn: Vec<T> = zeroed(if keep { n * h } else { max_rows * h });
    let mut gh: Vec<T> = zeroed(b * g3);
    let mut hs = h0.to_vec();
    let mut y: Vec<T> = zeroed(n * h);
    let nt = team_size(whh_t, threads, steps, b * g3 * (h + d.input));
    let (gp, ghp, hp, hnp, yp) = (
        Shared(gates.as_mut_ptr()),
        Shared(gh.as_mut_ptr()),
        Shared(hs.as_mut_ptr()),
        Shared(hn.as_mut_ptr()),
        Shared(y.as_mut_ptr()),
    );
    team::run(nt, |tid, bar| {
        let (u0, u1) = team::share(h, tid, nt, 16);
        let len = u1 - u0;
        let mut xs: Vec<T> = Vec::new(); // this thread's copy of a batch-first chunk
        let (c0_, c1_) = own_columns(g3, tid, nt);
        for &(c, (r0, r1)) in &chunks {
            let base = if keep { r0 } else { 0 };
            // SAFETY (whole block): as in `lstm_forward_chunked`: the projection and the step
            // product write only this thread's gate columns [c0_, c1_) (of the chunk's rows of
            // `gates`, of the step's rows of `gh`); between the barriers each thread writes only
            // its units of `gates`, `hs`, `hn`, `y`; all ranges lie inside the buffers.
            unsafe {
                let xrows =
                    chunk_input(x, d.input, (r0, r1), batch_first.then_some((b, steps)), &mut xs);
                project_chunk(
                    gp.ptr().add(base * g3),
                    g3,
                    &wih_t,
                    b_ih.as_deref(),
                    (c0_, c1_),
                    Lhs { a: xrows, lda: d.input, m: r1 - r0 },
                    (tid, nt),
                );
                for &t in &order[c.0..c.1] {
                    let (bs, o) = (batch_sizes[t], off[t]);
                    let lr = base + o - r0;
                    if let Some(bias) = &b_hh {
                        for j in 0..bs {
                            ghp.slice(j * g3 + c0_, c1_ - c0_).copy_from_slice(&bias[c0_..c1_]);
                        }
                    }
                    let hs_read: &[T] = std::slice::from_raw_parts(hp.ptr(), bs * h);
                    whh_t.mm_part(
                        ghp.ptr(),
                        g3,
                        Lhs { a: hs_read, lda: h, m: bs },
                        b_hh.is_some(),
                        (tid, nt),
                    );
                    bar.wait();
                    for j in 0..bs {
                        let r = lr + j;
                        let ghr: &[T] = ghp.slice(j * g3, g3);
                        let row = GruRow {
                            xr: gp.slice(r * g3 + u0, len),
                            xz: gp.slice(r * g3 + h + u0, len),
                            xn: gp.slice(r * g3 + 2 * h + u0, len),
                            hr: &ghr[u0..u1],
                            hz: &ghr[h + u0..h + u1],
                            hn: &ghr[2 * h + u0..2 * h + u1],
                        };
                        let yr = if batch_first { bf_row(o + j, b, steps) } else { o + j };
                        T::gru_cell(
                            row,
                            hp.slice(j * h + u0, len),
                            hnp.slice(r * h + u0, len),
                            yp.slice(yr * h + u0, len),
                        );
                    }
                    bar.wait();
                }
            }
        }
    });
    if !keep {
        return GruOut { y, h_n: hs, gates: Vec::new(), hn: Vec::new() };
    }
    GruOut { y, h_n: hs, gates, hn }
}

/// GRU backward through time, as [`lstm_backward`]: `dgx`, `dgh`, `hprev` and `dh0`
/// (`grads.dc_n` must be empty: a GRU has no cell state).
pub fn gru_backward<T: Float>(
    w: &Layer<'_, T>,
    input: Input<'_, T>,
    h0: &[T],
    saved: Saved<'_, T>,
    grads: OutputGrads<'_, T>,
    threads: usize,
) -> Result<Grads<T>> {
    let Input { x, batch_sizes, reverse } = input;
    let OutputGrads { dy, dh_n, dc_n } = grads;
    let d = w.dims;
    let fwd = saved;
    let (off, n) = offsets(batch_sizes)?;
    let (h, b) = (d.hidden, batch_sizes[0]);
    check_len("grad_output", dy, n * h)?;
    check_len("grad_h_n", dh_n, b * h)?;
    check_len("grad_c_n", dc_n, 0)?;
    check_len("saved outputs", fwd.y, n * h)?;
    check_len("saved gates", fwd.gates, n * 3 * h)?;
    check_len("saved candidates", fwd.cs, n * h)?;
    w.check(3)?;
    check_len("input", x, n * d.input)?;
    check_len("h0", h0, b * h)?;
    let g3 = 3 * h;
    let ldg = grad_stride(g3);
    let mut dgx = zeroed(n * ldg);
    let mut dgh = zeroed(n * ldg);
    let mut hprev = zeroed(n * h);
    let mut dh = dh_n.to_vec();
    let whh = StepB::new(Mat::rm(w.w_hh, g3, h), b);
    let nt = team_size(&whh, threads, batch_sizes.len(), b * g3 * h);
    let one = T::ONE;
    let (dgxp, dghp, hpp, dhp) = (
        Shared(dgx.as_mut_ptr()),
        Shared(dgh.as_mut_ptr()),
        Shared(hprev.as_mut_ptr()),
        Shared(dh.as_mut_ptr()),
    );
    team::run(nt, |tid, bar| {
        let (u0, u1) = team::share(h, tid, nt, 16);
        let len = u1 - u0;
        for t in order(batch_sizes.len(), !reverse) {
            let (bs, o) = (batch_sizes[t], off[t]);
            // SAFETY (whole block): as in the LSTM backward: phase 1 touches only this thread's
            // units; phase 2 reads the step's complete `dgh` rows and adds into this thread's
            // columns of `dh` only.
            unsafe {
                for j in 0..bs {
                    let row = o + j;
                    let h_prev = match prev_row(t, j, reverse, batch_sizes, &off) {
                        Some(r) => &fwd.y[r * h + u0..r * h + u1],
                        None => &h0[j * h + u0..j * h + u1],
                    };
                    hpp.slice(row * h + u0, len).copy_from_slice(h_prev);
                    let gr = &fwd.gates[row * g3..(row + 1) * g3];
                    let hnr = &fwd.cs[row * h + u0..row * h + u1];
                    let dyr = &dy[row * h + u0..row * h + u1];
                    let dhr = dhp.slice(j * h + u0, len);
                    let (xr, xz, xn) = (
                        dgxp.slice(row * ldg + u0, len),
                        dgxp.slice(row * ldg + h + u0, len),
                        dgxp.slice(row * ldg + 2 * h + u0, len),
                    );
                    let (hr_, hz_, hn_) = (
                        dghp.slice(row * ldg + u0, len),
                        dghp.slice(row * ldg + h + u0, len),
                        dghp.slice(row * ldg + 2 * h + u0, len),
                    );
                    for q in 0..len {
                        let k = u0 + q;
                        let (r, z, nn) = (gr[k], gr[h + k], gr[2 * h + k]);
                        let dhv = dhr[q] + dyr[q];
                        let dn = dhv * (one - z);
                        let dz = dhv * (h_prev[q] - nn);
                        let dan = dn * (one - nn * nn);
                        let dar = dan * hnr[q] * r * (one - r);
                        let daz = dz * z * (one - z);
                        xr[q] = dar;
                        xz[q] = daz;
                        xn[q] = dan;
                        hr_[q] = dar;
                        hz_[q] = daz;
                        hn_[q] = dan * r;
                        dhr[q] = dhv * z; // the direct path; the W_hh path is added below
                    }
                }
                bar.wait();
                let dg_read: &[T] =
                    std::slice::from_raw_parts(dghp.ptr().add(o * ldg), (bs - 1) * ldg + g3);
                if nt > 1 {
                    whh.mm_part(dhp.ptr(), h, Lhs { a: dg_read, lda: ldg, m: bs }, true, (tid, nt));
                } else {
                    whh.mm(
                        dhp.slice(0, bs * h),
                        h,
                        Lhs { a: dg_read, lda: ldg, m: bs },
                        true,
                        threads,
                    );
                }
            }
        }
    });
    Ok(Grads { dh0: dh, dc0: Vec::new(), dgx, dgh, hprev, ldg })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A training forward (keeping what the backward reads) on one thread.
    const TRAIN: ForwardOptions = ForwardOptions { keep: true, batch_first: false, threads: 1 };

    /// What the caller forms from the backward's output (see [`Grads`]), by direct sums:
    /// `[dx, dW_ih, dW_hh, db_ih, db_hh]`.
    fn caller_products(
        g: &Grads<f64>,
        x: &[f64],
        w_ih: &[f64],
        d: Dims,
        n: usize,
        gates: usize,
    ) -> [Vec<f64>; 5] {
        let (gw, input, hidden, ldg) = (gates * d.hidden, d.input, d.hidden, g.ldg);
        let dgh = if g.dgh.is_empty() { &g.dgx } else { &g.dgh };
        let dx = (0..n * input)
            .map(|e| {
                (0..gw).map(|c| g.dgx[e / input * ldg + c] * w_ih[c * input + e % input]).sum()
            })
            .collect();
        let outer = |dg: &[f64], a: &[f64], k: usize| -> Vec<f64> {
            (0..gw * k)
                .map(|e| (0..n).map(|r| dg[r * ldg + e / k] * a[r * k + e % k]).sum())
                .collect()
        };
        let col_sums = |dg: &[f64]| -> Vec<f64> {
            (0..gw).map(|c| (0..n).map(|r| dg[r * ldg + c]).sum()).collect()
        };
        [dx, outer(&g.dgx, x, input), outer(dgh, &g.hprev, hidden), col_sums(&g.dgx), col_sums(dgh)]
    }

    /// Finite-difference check of every gradient of a loss sum(y * gy) + sum(h_n * gh) (+ c_n).
    fn check(lstm: bool, reverse: bool) {
        let d = Dims { input: 3, hidden: 4 };
        let bs = [3usize, 3, 2, 1];
        let n: usize = bs.iter().sum();
        let gates = if lstm { 4 } else { 3 };
        let mut rng = crate::testutil::Lcg(7);
        let x = rng.uniform(n * d.input);
        let h0 = rng.uniform(3 * d.hidden);
        let c0 = rng.uniform(3 * d.hidden);
        let wih = rng.uniform(gates * d.hidden * d.input);
        let whh = rng.uniform(gates * d.hidden * d.hidden);
        let bih = rng.uniform(gates * d.hidden);
        let bhh = rng.uniform(gates * d.hidden);
        let gy = rng.uniform(n * d.hidden);
        let gh = rng.uniform(3 * d.hidden);
        let gc = rng.uniform(3 * d.hidden);
        let loss = |x: &[f64],
                    h0: &[f64],
                    c0: &[f64],
                    wih: &[f64],
                    whh: &[f64],
                    bih: &[f64],
                    bhh: &[f64]|
         -> f64 {
            let w = Layer { dims: d, w_ih: wih, w_hh: whh, b_ih: Some(bih), b_hh: Some(bhh) };
            let input = Input { x, batch_sizes: &bs, reverse };
            let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(p, q)| p * q).sum::<f64>();
            if lstm {
                let o = lstm_forward(&w, input, State { h0, c0 }, TRAIN).unwrap();
                dot(&o.y, &gy) + dot(&o.h_n, &gh) + dot(&o.c_n, &gc)
            } else {
                let o = gru_forward(&w, input, h0, TRAIN).unwrap();
                dot(&o.y, &gy) + dot(&o.h_n, &gh)
            }
        };
        let w = Layer { dims: d, w_ih: &wih, w_hh: &whh, b_ih: Some(&bih), b_hh: Some(&bhh) };
        let input = Input { x: &x, batch_sizes: &bs, reverse };
        let g = if lstm {
            let init = State { h0: &h0, c0: &c0 };
            let o = lstm_forward(&w, input, init, TRAIN).unwrap();
            let saved = Saved { y: &o.y, gates: &o.gates, cs: &o.cs };
            let grads = OutputGrads { dy: &gy, dh_n: &gh, dc_n: &gc };
            lstm_backward(&w, input, init, saved, grads, 1).unwrap()
        } else {
            let o = gru_forward(&w, input, &h0, TRAIN).unwrap();
            let saved = Saved { y: &o.y, gates: &o.gates, cs: &o.hn };
            let grads = OutputGrads { dy: &gy, dh_n: &gh, dc_n: &[] };
            gru_backward(&w, input, &h0, saved, grads, 1).unwrap()
        };
        let p = caller_products(&g, &x, &wih, d, n, gates);
        let args = [x, h0, c0, wih, whh, bih, bhh];
        let analytic = [&p[0], &g.dh0, &g.dc0, &p[1], &p[2], &p[3], &p[4]];
        for (a, grad) in analytic.iter().enumerate() {
            if !lstm && a == 2 {
                continue; // GRU has no cell state
            }
            for k in 0..args[a].len() {
                let eps = 1e-6;
                let mut plus = args.clone();
                plus[a][k] += eps;
                let mut minus = args.clone();
                minus[a][k] -= eps;
                let f = |v: &[Vec<f64>; 7]| loss(&v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6]);
                let num = (f(&plus) - f(&minus)) / (2.0 * eps);
                assert!(
                    (num - grad[k]).abs() < 1e-7 * (1.0 + num.abs()),
                    "lstm={lstm} reverse={reverse} arg {a} [{k}]: numeric {num} vs analytic {}",
                    grad[k]
                );
            }
        }
    }

    #[test]
    fn lstm_gradients_match_finite_differences() {
        check(true, false);
        check(true, true);
    }

    #[test]
    fn gru_gradients_match_finite_differences() {
        check(false, false);
        check(false, true);
    }

    #[test]
    fn f32_backward_with_padded_gate_rows_matches_f64() {
        // H = 64: 4H = 256 gate columns, so the gate-gradient rows are padded; the f64 path
        // (general GEMM for the recurrent product) is the reference.
        let d = Dims { input: 24, hidden: 64 };
        let bs = [5usize, 5, 4, 4, 2, 1];
        let n: usize = bs.iter().sum();
        let mut rng = crate::testutil::Lcg(9);
        let vals = [n * 24, 5 * 64, 5 * 64, 256 * 24, 256 * 64, 256, 256, n * 64, 5 * 64, 5 * 64];
        let v: Vec<Vec<f64>> =
            vals.iter().map(|&m| rng.uniform(m).iter().map(|x| x * 0.5).collect()).collect();
        let f = |x: &Vec<f64>| -> Vec<f32> { x.iter().map(|&a| a as f32).collect() };
        let v32: Vec<Vec<f32>> = v.iter().map(f).collect();
        let w64 = Layer {
            dims: d,
            w_ih: &v[3],
            w_hh: &v[4],
            b_ih: Some(&v[5][..]),
            b_hh: Some(&v[6][..]),
        };
        let w32 = Layer {
            dims: d,
            w_ih: &v32[3],
            w_hh: &v32[4],
            b_ih: Some(&v32[5][..]),
            b_hh: Some(&v32[6][..]),
        };
        for reverse in [false, true] {
            let (in64, in32) = (
                Input { x: &v[0], batch_sizes: &bs, reverse },
                Input { x: &v32[0], batch_sizes: &bs, reverse },
            );
            let (init64, init32) =
                (State { h0: &v[1], c0: &v[2] }, State { h0: &v32[1], c0: &v32[2] });
            let o64 = lstm_forward(&w64, in64, init64, TRAIN).unwrap();
            let o32 =
                lstm_forward(&w32, in32, init32, ForwardOptions { threads: 2, ..TRAIN }).unwrap();
            let s64 = Saved { y: &o64.y, gates: &o64.gates, cs: &o64.cs };
            let s32 = Saved { y: &o32.y, gates: &o32.gates, cs: &o32.cs };
            let up64 = OutputGrads { dy: &v[7], dh_n: &v[8], dc_n: &v[9] };
            let up32 = OutputGrads { dy: &v32[7], dh_n: &v32[8], dc_n: &v32[9] };
            let g64 = lstm_backward(&w64, in64, init64, s64, up64, 1).unwrap();
            let g32 = lstm_backward(&w32, in32, init32, s32, up32, 2).unwrap();
            let close = |a: &[f32], b: &[f64], what: &str| {
                assert_eq!(a.len(), b.len(), "{what}");
                for (x, y) in a.iter().zip(b) {
                    assert!(
                        (*x as f64 - y).abs() <= 1e-4 * (1.0 + y.abs()),
                        "{what} reverse={reverse}: {x} vs {y}"
                    );
                }
            };
            close(&g32.dh0, &g64.dh0, "dh0");
            close(&g32.dc0, &g64.dc0, "dc0");
            close(&g32.hprev, &g64.hprev, "hprev");
            // Padded gate-gradient rows whose first 4H columns are the same gradients.
            assert_eq!((g32.ldg, g64.ldg), (272, 272));
            for r in 0..n {
                close(&g32.dgx[r * 272..r * 272 + 256], &g64.dgx[r * 272..r * 272 + 256], "dgx");
            }
        }
    }

    #[test]
    fn bad_batch_sizes_are_errors() {
        let dims = Dims { input: 1, hidden: 2 };
        let w = Layer::<f32> { dims, w_ih: &[0.0; 8], w_hh: &[0.0; 16], b_ih: None, b_hh: None };
        let init = State { h0: &[0.0; 2], c0: &[0.0; 2] };
        for batch_sizes in [&[1, 2][..], &[]] {
            let input = Input { x: &[0.0; 3], batch_sizes, reverse: false };
            assert!(lstm_forward(&w, input, init, TRAIN).is_err());
        }
    }
}
