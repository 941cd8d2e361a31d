//! One decoding step of a whole Llama-family model in a single call: B rows, one new token
//! each, through every layer (RMSNorm, q/k/v projections, rotary positions, the KV-cache
//! write, grouped-query attention over each row's cache, the output projection, SwiGLU) to
//! the logits.
//!
//! Why fused: at batch 1 a quantized SmolLM2 token moves ~96 MB of weights, ~5 ms at the
//! machine's bandwidth, while the same step as ~25 torch operations per layer costs several
//! milliseconds of Python and dispatch on its own. Here the whole step is one team of threads
//! (`team::run`) that meets at five barriers per layer: the matrix products split their output
//! rows across threads (each thread streams its share of each weight once), attention splits
//! the (row, kv head) pairs, and the small vector work (norms, residuals, activation
//! quantization) is repeated on every thread on its own copy of the hidden state, which costs
//! less than another barrier would.

use super::fgemv;
use super::packed::{self, Packed};
use super::{dequantize_row, dot, Isa, QType, QuantRows};
use crate::kernels::decode::{dot as dot_f32, KvElem};
use crate::kernels::team::{self, Shared};

/// A weight matrix (n rows of k values): GGUF blocks, the same blocks interleaved by 16 rows
/// ([`Packed`]), or float32 rows.
#[derive(Clone, Copy)]
pub enum Weight<'a> {
    Q { w: &'a [u8], qt: QType },
    P(&'a Packed),
    F(&'a [f32]),
}

/// `y = x Wᵀ (+ bias)`.
#[derive(Clone, Copy)]
pub struct Linear<'a> {
    pub w: Weight<'a>,
    pub n: usize,
    pub k: usize,
    pub bias: Option<&'a [f32]>,
}

pub struct Layer<'a> {
    pub attn_norm: &'a [f32],
    pub q: Linear<'a>,
    pub k: Linear<'a>,
    pub v: Linear<'a>,
    pub o: Linear<'a>,
    pub ffn_norm: &'a [f32],
    pub gate: Linear<'a>,
    pub up: Linear<'a>,
    pub down: Linear<'a>,
}

pub struct Model<'a> {
    /// The token embedding: `vocab` rows of `n_embd`.
    pub embed: Linear<'a>,
    pub layers: Vec<Layer<'a>>,
    pub norm: &'a [f32],
    pub head: Linear<'a>,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub eps: f32,
    /// Rotary frequencies (head_dim / 2).
    pub inv_freq: &'a [f32],
}

/// Per-layer KV caches, each `(batch, n_kv_head, capacity, head_dim)` row-major, of float32 or
/// float16 (`E`: converted on load and store, see [`KvElem`]).
pub struct Cache<E = f32> {
    pub k: Vec<Shared<E>>,
    pub v: Vec<Shared<E>>,
    pub batch: usize,
    pub capacity: usize,
}

impl Model<'_> {
    /// Checks every shape against the config; the error names the tensor.
    pub fn check(&self) -> Result<(), String> {
        let c = self.embed.k;
        let (h, hk, d) = (self.n_head, self.n_kv_head, self.head_dim);
        if hk == 0 || h % hk != 0 || d % 2 != 0 || self.inv_freq.len() != d / 2 {
            return Err(format!("bad attention shape: {h} heads, {hk} kv heads, head dim {d}"));
        }
        let lin = |name: &str, l: &Linear<'_>, n: usize, k: usize| -> Result<(), String> {
            if l.n != n || l.k != k {
                return Err(format!("{name}: shape ({}, {}), expected ({n}, {k})", l.n, l.k));
            }
            let ok = match l.w {
                Weight::Q { w, qt } => super::check(qt, n, k, w.len()).map(|_| ()),
                Weight::P(p) => (p.n == n && p.k == k)
                    .then_some(())
                    .ok_or_else(|| format!("packed as ({}, {})", p.n, p.k)),
                Weight::F(w) => (w.len() == n * k)
                    .then_some(())
                    .ok_or_else(|| format!("{} values, expected {}", w.len(), n * k)),
            };
            ok.map_err(|e| format!("{name}: {e}"))?;
            if let Some(b) = l.bias {
                if b.len() != n {
                    return Err(format!("{name}: bias of {} values, expected {n}", b.len()));
                }
            }
            Ok(())
        };
        if let Weight::P(_) = self.embed.w {
            return Err("embedding: packed rows cannot be looked up".into());
        }
        lin("embedding", &self.embed, self.embed.n, c)?;
        lin("head", &self.head, self.head.n, c)?;
        if self.norm.len() != c {
            return Err(format!("final norm: {} values, expected {c}", self.norm.len()));
        }
        for (i, l) in self.layers.iter().enumerate() {
            let f = l.gate.n;
            let p = |s: &str| format!("layer {i} {s}");
            lin(&p("q_proj"), &l.q, h * d, c)?;
            lin(&p("k_proj"), &l.k, hk * d, c)?;
            lin(&p("v_proj"), &l.v, hk * d, c)?;
            lin(&p("o_proj"), &l.o, c, h * d)?;
            lin(&p("gate_proj"), &l.gate, f, c)?;
            lin(&p("up_proj"), &l.up, f, c)?;
            lin(&p("down_proj"), &l.down, c, f)?;
            if l.attn_norm.len() != c || l.ffn_norm.len() != c {
                return Err(p("norm: wrong length"));
            }
            if let (Weight::Q { .. } | Weight::P(_), true) = (l.q.w, !c.is_multiple_of(32)) {
                return Err(p("width not a multiple of 32"));
            }
        }
        Ok(())
    }
}

fn rmsnorm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let c = w.len();
    for (xr, or) in x.chunks_exact(c).zip(out.chunks_exact_mut(c)) {
        let ss: f32 = xr.iter().map(|v| v * v).sum::<f32>() / c as f32;
        let r = 1.0 / (ss + eps).sqrt();
        for ((o, v), g) in or.iter_mut().zip(xr).zip(w) {
            *o = g * (v * r);
        }
    }
}

/// This thread's share of the columns of `x (m × k) · Wᵀ` into `out (m × n)`: thread `tid`
/// of `threads` takes a contiguous run of output rows of W (whole 16-row groups when packed).
#[allow(clippy::too_many_arguments)]
fn linear_rows(
    l: &Linear<'_>,
    x: &[f32],
    xq: Option<&QuantRows>,
    m: usize,
    (tid, threads): (usize, usize),
    isa: Isa,
    out: &Shared<f32>,
) {
    let (n, k) = (l.n, l.k);
    let align = if matches!(l.w, Weight::P(_)) { packed::ROWS } else { 1 };
    let rows = team::share(n, tid, threads, align);
    if let Weight::P(p) = l.w {
        let acts = xq.expect("quantized activations");
        for i in 0..m {
            // SAFETY: columns rows.0..rows.1 of output row i are inside out (m × n) and this
            // thread's alone.
            let o = unsafe {
                std::slice::from_raw_parts_mut(out.ptr().add(i * n + rows.0), rows.1 - rows.0)
            };
            let groups = (rows.0 / packed::ROWS, rows.1 / packed::ROWS);
            packed::gemv(isa, p, acts.row(i), groups, o);
            add_bias(o, l.bias, rows.0);
        }
        return;
    }
    if let Weight::F(w) = l.w {
        // Four weight rows meet every input row while they sit in L1 (fgemv::block).
        fgemv::block(isa, w, &x[..m * k], m, rows, |i, j, v| {
            // SAFETY: (i, j) is inside out (m × n), and column j (in rows) is this thread's.
            unsafe { *out.ptr().add(i * n + j) = v + l.bias.map_or(0.0, |b| b[j]) };
        });
        return;
    }
    for j in rows.0..rows.1 {
        let bias = l.bias.map_or(0.0, |b| b[j]);
        match l.w {
            Weight::Q { w, qt } => {
                let rb = w.len() / n;
                let wrow = &w[j * rb..(j + 1) * rb];
                let acts = xq.expect("quantized activations");
                let mut i = 0;
                while i + 4 <= m {
                    let r = [acts.row(i), acts.row(i + 1), acts.row(i + 2), acts.row(i + 3)];
                    let d = dot::dot4(isa, qt, wrow, &r);
                    for (t, v) in d.iter().enumerate() {
                        // SAFETY: (i + t, j) is inside out (m × n); column j is this thread's.
                        unsafe { *out.ptr().add((i + t) * n + j) = v + bias };
                    }
                    i += 4;
                }
                while i < m {
                    let v = dot::dot1(isa, qt, wrow, acts.row(i));
                    // SAFETY: as above.
                    unsafe { *out.ptr().add(i * n + j) = v + bias };
                    i += 1;
                }
            }
            Weight::F(_) | Weight::P(_) => unreachable!("handled above"),
        }
    }
}

/// `o[t] += bias[j0 + t]`, when the layer has a bias.
fn add_bias(o: &mut [f32], bias: Option<&[f32]>, j0: usize) {
    if let Some(bias) = bias {
        for (v, b) in o.iter_mut().zip(&bias[j0..]) {
            *v += b;
        }
    }
}

fn quantized(l: &Linear<'_>, x: &[f32], m: usize) -> Option<QuantRows> {
    matches!(l.w, Weight::Q { .. } | Weight::P(_)).then(|| QuantRows::new(x, m, l.k, 1))
}

/// (sin, cos) of `pos · inv_freq[i]` for each frequency (angles in f32, as transformers).
fn rope_table(pos: usize, inv_freq: &[f32]) -> Vec<(f32, f32)> {
    inv_freq.iter().map(|f| (pos as f32 * f).sin_cos()).collect()
}

/// Rotates the pairs (i, i + D/2) of `v` by the angles of `table` (transformers' rotate_half).
fn rope(v: &mut [f32], table: &[(f32, f32)]) {
    let half = table.len();
    for (i, &(s, c)) in table.iter().enumerate() {
        let (x0, x1) = (v[i], v[i + half]);
        v[i] = x0 * c - x1 * s;
        v[i + half] = x1 * c + x0 * s;
    }
}

/// One token per row through the whole model: `tokens[b]` at position `pos[b]` (the row's
/// cache length, where its key and value are written), logits into `logits (B × vocab)`.
///
/// Panics on shapes the caller did not check ([`Model::check`], cache sizes, ids < vocab,
/// positions < capacity).
pub fn step<E: KvElem<f32>>(
    m: &Model<'_>,
    cache: &Cache<E>,
    tokens: &[usize],
    pos: &[usize],
    isa: Isa,
    threads: usize,
    logits: &mut [f32],
) {
    let b = tokens.len();
    let c = m.embed.k;
    let (h, hk, d) = (m.n_head, m.n_kv_head, m.head_dim);
    let g = h / hk;
    let f = m.layers.first().map_or(0, |l| l.gate.n);
    let vocab = m.head.n;
    assert!(pos.len() == b && b <= cache.batch && logits.len() == b * vocab);
    let mut q_s = vec![0f32; b * h * d];
    let mut k_s = vec![0f32; b * hk * d];
    let mut v_s = vec![0f32; b * hk * d];
    let mut att_s = vec![0f32; b * h * d];
    let mut o_s = vec![0f32; b * c];
    let mut gate_s = vec![0f32; b * f];
    let mut up_s = vec![0f32; b * f];
    let (q_p, k_p, v_p) =
        (Shared(q_s.as_mut_ptr()), Shared(k_s.as_mut_ptr()), Shared(v_s.as_mut_ptr()));
    let (att_p, o_p) = (Shared(att_s.as_mut_ptr()), Shared(o_s.as_mut_ptr()));
    let (gate_p, up_p) = (Shared(gate_s.as_mut_ptr()), Shared(up_s.as_mut_ptr()));
    let logits_p = Shared(logits.as_mut_ptr());
    let threads = if crate::parallel::in_forked_child() { 1 } else { threads.max(1) };
    let (cap, scale) = (cache.capacity, 1.0 / (d as f32).sqrt());
    let tables: Vec<Vec<(f32, f32)>> = pos.iter().map(|&p| rope_table(p, m.inv_freq)).collect();

    team::run(threads, |tid, bar| {
        let me = (tid, threads);
        // Read a shared buffer after the barrier that ended its writes.
        // SAFETY (for every `view`): the buffers live until `run` returns, and every write to
        // them happened before the barrier this thread has passed.
        let view =
            |p: &Shared<f32>, len: usize| unsafe { std::slice::from_raw_parts(p.ptr(), len) };
        let mut x = vec![0f32; b * c];
        for (r, &t) in tokens.iter().enumerate() {
            let xr = &mut x[r * c..(r + 1) * c];
            match m.embed.w {
                Weight::Q { w, qt } => {
                    let rb = w.len() / m.embed.n;
                    dequantize_row(qt, &w[t * rb..(t + 1) * rb], xr);
                }
                Weight::F(w) => xr.copy_from_slice(&w[t * c..(t + 1) * c]),
                Weight::P(_) => unreachable!("the embedding is never packed"),
            }
        }
        let mut hbuf = vec![0f32; b * c];
        let mut act = vec![0f32; b * f];
        let mut qv = vec![0f32; d];
        let mut scores = vec![0f32; cap];
        let (mut knew, mut kbuf, mut vbuf) = (vec![0f32; d], Vec::new(), Vec::new());
        for (li, l) in m.layers.iter().enumerate() {
            rmsnorm(&x, l.attn_norm, m.eps, &mut hbuf);
            let hq = quantized(&l.q, &hbuf, b);
            linear_rows(&l.q, &hbuf, hq.as_ref(), b, me, isa, &q_p);
            linear_rows(&l.k, &hbuf, hq.as_ref(), b, me, isa, &k_p);
            linear_rows(&l.v, &hbuf, hq.as_ref(), b, me, isa, &v_p);
            bar.wait();
            let (qs, ks, vs) =
                (view(&q_p, b * h * d), view(&k_p, b * hk * d), view(&v_p, b * hk * d));
            let (kc, vc) = (&cache.k[li], &cache.v[li]);
            let mut unit = tid;
            while unit < b * hk {
                let (r, kh) = (unit / hk, unit % hk);
                let p = pos[r];
                let base = ((r * hk + kh) * cap) * d;
                // SAFETY: (r, kh, p) is inside the cache (p < capacity, checked by the caller);
                // this (row, kv head) is this thread's alone.
                let (kdst, vdst) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(kc.ptr().add(base + p * d), d),
                        std::slice::from_raw_parts_mut(vc.ptr().add(base + p * d), d),
                    )
                };
                knew.copy_from_slice(&ks[(r * hk + kh) * d..(r * hk + kh + 1) * d]);
                rope(&mut knew, &tables[r]);
                E::store(&knew, kdst);
                E::store(&vs[(r * hk + kh) * d..(r * hk + kh + 1) * d], vdst);
                // SAFETY: positions 0..=p of this (row, kv head), written before this step or
                // just above by this thread.
                let (kr, vr) = unsafe {
                    (
                        std::slice::from_raw_parts(kc.ptr().add(base), (p + 1) * d),
                        std::slice::from_raw_parts(vc.ptr().add(base), (p + 1) * d),
                    )
                };
                // As f32 (the cache itself when it is f32, a converted copy of f16).
                let (kr, vr) = (E::view(kr, &mut kbuf), E::view(vr, &mut vbuf));
                for qh in kh * g..(kh + 1) * g {
                    qv.copy_from_slice(&qs[(r * h + qh) * d..(r * h + qh + 1) * d]);
                    rope(&mut qv, &tables[r]);
                    let sc = &mut scores[..p + 1];
                    let mut mx = f32::NEG_INFINITY;
                    for (j, s) in sc.iter_mut().enumerate() {
                        *s = dot_f32(&qv, &kr[j * d..(j + 1) * d]) * scale;
                        mx = mx.max(*s);
                    }
                    let mut sum = 0f32;
                    for s in sc.iter_mut() {
                        *s = (*s - mx).exp();
                        sum += *s;
                    }
                    // SAFETY: the output of (row, q head) is this thread's alone.
                    let o = unsafe {
                        std::slice::from_raw_parts_mut(att_p.ptr().add((r * h + qh) * d), d)
                    };
                    o.fill(0.0);
                    for (j, s) in sc.iter().enumerate() {
                        let wj = s / sum;
                        for (oi, vi) in o.iter_mut().zip(&vr[j * d..(j + 1) * d]) {
                            *oi += wj * vi;
                        }
                    }
                }
                unit += threads;
            }
            bar.wait();
            let att = view(&att_p, b * h * d);
            let aq = quantized(&l.o, att, b);
            linear_rows(&l.o, att, aq.as_ref(), b, me, isa, &o_p);
            bar.wait();
            for (xi, oi) in x.iter_mut().zip(view(&o_p, b * c)) {
                *xi += oi;
            }
            rmsnorm(&x, l.ffn_norm, m.eps, &mut hbuf);
            let hq = quantized(&l.gate, &hbuf, b);
            linear_rows(&l.gate, &hbuf, hq.as_ref(), b, me, isa, &gate_p);
            linear_rows(&l.up, &hbuf, hq.as_ref(), b, me, isa, &up_p);
            bar.wait();
            for ((a, gv), uv) in act.iter_mut().zip(view(&gate_p, b * f)).zip(view(&up_p, b * f)) {
                *a = gv / (1.0 + (-gv).exp()) * uv;
            }
            let aq = quantized(&l.down, &act, b);
            linear_rows(&l.down, &act, aq.as_ref(), b, me, isa, &o_p);
            bar.wait();
            for (xi, oi) in x.iter_mut().zip(view(&o_p, b * c)) {
                *xi += oi;
            }
            // Everyone has read o_p before the next layer's o_proj overwrites it: that write
            // comes after two more barriers.
        }
        rmsnorm(&x, m.norm, m.eps, &mut hbuf);
        let hq = quantized(&m.head, &hbuf, b);
        linear_rows(&m.head, &hbuf, hq.as_ref(), b, me, isa, &logits_p);
    });
}
