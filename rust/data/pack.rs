//! Packing documents into fixed-length rows, and language-model windows over one stream.

use rayon::prelude::*;

use super::{bad_id, Row};
use crate::{Error, Result};

/// The label that loss functions ignore (torch's `cross_entropy` default `ignore_index`).
pub const IGNORE: i64 = -100;

/// Packed rows, each row-major `(rows, block_size)`.
#[derive(Debug, Default)]
pub struct Packed {
    pub input_ids: Vec<i64>,
    pub targets: Vec<i64>,
    pub position_ids: Vec<i64>,
    pub doc_ids: Vec<i64>,
    pub rows: usize,
}

/// Packs documents into rows of `block_size` tokens.
///
/// The stream is every document followed by `eos` (when given), back to back. Row `r` holds
/// stream tokens `[r*T, (r+1)*T)` and its targets are the tokens one step later; a final
/// partial row is dropped unless `keep_last` (then padded with `pad_id`, targets `IGNORE`).
/// `position_ids` count from 0 at each document start and at each row start, so they stay
/// below `block_size`; `doc_ids` are the index of the document each input token belongs to
/// (an `eos` belongs to the document it ends), so attention can be kept within a document.
/// With `mask_cross_document`, a target from another document than its input is `IGNORE`.
pub fn pack(
    docs: &[Row<'_>],
    block_size: usize,
    eos: Option<i64>,
    keep_last: bool,
    pad_id: i64,
    mask_cross_document: bool,
) -> Result<Packed> {
    if block_size == 0 {
        return Err(Error::value("block_size must be positive, got 0"));
    }
    if docs.is_empty() {
        return Err(Error::value("cannot pack an empty list of documents"));
    }
    if let Some(e) = eos {
        if e < 0 {
            return Err(Error::value(format!("eos_id must be non-negative, got {e}")));
        }
    }
    for (i, d) in docs.iter().enumerate() {
        d.check(0, d.len(), i64::MAX).map_err(|(p, v)| bad_id(i, p, v, i64::MAX, "int64"))?;
    }
    let extra = usize::from(eos.is_some());
    // Document i occupies stream positions [start[i], start[i+1]) (its eos included).
    let mut start = super::try_with_capacity(docs.len() + 1, || "pack: document offsets".into())?;
    start.push(0usize);
    for d in docs {
        start.push(start.last().copied().unwrap_or(0) + d.len() + extra);
    }
    let total = *start.last().unwrap_or(&0);
    if total < 2 {
        return Err(Error::value("the documents hold fewer than 2 tokens; nothing to predict"));
    }
    let full = (total - 1) / block_size;
    let rows = if keep_last && full * block_size < total - 1 { full + 1 } else { full };
    let t = block_size;
    let token = |doc: usize, k: usize| -> i64 {
        if k < docs[doc].len() {
            docs[doc].get(k)
        } else {
            eos.unwrap_or(0)
        }
    };
    let fix = "lower block_size (it need not exceed the tokens of the documents)";
    let cells = super::output_cells(rows, t, total - 1, || format!("block_size={t}"), fix)?;
    let what = || format!("pack: a {rows} x {t} int64 batch");
    let mut p = Packed {
        input_ids: super::try_filled(cells, pad_id, what)?,
        targets: super::try_filled(cells, IGNORE, what)?,
        position_ids: super::try_filled(cells, 0, what)?,
        doc_ids: super::try_filled(cells, -1, what)?,
        rows,
    };
    // Rows are independent given where they start, so both cores fill them (the work is
    // memory writes: four (N, T) int64 outputs).
    let chunks = p
        .input_ids
        .par_chunks_mut(t)
        .zip(p.targets.par_chunks_mut(t))
        .zip(p.position_ids.par_chunks_mut(t))
        .zip(p.doc_ids.par_chunks_mut(t))
        .enumerate();
    chunks.for_each(|(r, (((x, y), pos), did))| {
        let s0 = r * t;
        let n = t.min(total - 1 - s0);
        // The document holding stream position s0.
        let mut doc = start.partition_point(|&b| b <= s0) - 1;
        let mut k = s0 - start[doc];
        let mut p_in_doc = 0i64;
        for j in 0..n {
            while k >= start[doc + 1] - start[doc] {
                doc += 1;
                k = 0;
                p_in_doc = 0;
            }
            x[j] = token(doc, k);
            pos[j] = p_in_doc;
            did[j] = doc as i64;
            // The target is the next stream position.
            let (tdoc, tk) = if k + 1 < start[doc + 1] - start[doc] {
                (doc, k + 1)
            } else {
                // The next non-empty document (one exists: this is not the last position).
                let mut d = doc + 1;
                while start[d + 1] == start[d] {
                    d += 1;
                }
                (d, 0)
            };
            y[j] = if mask_cross_document && tdoc != doc { IGNORE } else { token(tdoc, tk) };
            k += 1;
            p_in_doc += 1;
        }
    });
    Ok(p)
}

/// Language-model windows over one token stream.
#[derive(Debug, Default)]
pub struct Windows {
    pub input_ids: Vec<i64>,
    pub targets: Vec<i64>,
    pub attention_mask: Vec<i64>,
    pub rows: usize,
}

/// Cuts `tokens` into windows of `block_size` inputs starting every `stride` tokens, with
/// next-token targets. Each token after the first is a target exactly once: in a window that
/// overlaps the previous one, targets the previous window already scored are `IGNORE` (the
/// sliding-window perplexity of HF's guide). The last window may be short: padded with
/// `pad_id`, mask 0, targets `IGNORE`.
pub fn windows(tokens: Row<'_>, block_size: usize, stride: usize, pad_id: i64) -> Result<Windows> {
    if block_size == 0 {
        return Err(Error::value("block_size must be positive, got 0"));
    }
    if stride == 0 || stride > block_size {
        return Err(Error::value(format!(
            "stride must be in 1..=block_size ({block_size}), got {stride}"
        )));
    }
    let l = tokens.len();
    if l < 2 {
        return Err(Error::value(format!("need at least 2 tokens to make a window, got {l}")));
    }
    let mut stream = super::try_filled(l, 0i64, || "lm_windows: the token stream".into())?;
    tokens
        .copy_checked(0, &mut stream, i64::MAX)
        .map_err(|(p, v)| bad_id(0, p, v, i64::MAX, "int64"))?;
    let t = block_size;
    // Targets are stream[1..l]; window k starts at k*stride and scores targets up to
    // min(k*stride + t, l - 1) (exclusive, in input positions). The window count and the
    // cells they fill are known up front, so the size is checked before allocating.
    let m = l - 1;
    let rows = if m <= t { 1 } else { 1 + (m - t).div_ceil(stride) };
    let last = m - (rows - 1) * stride; // inputs of the last window (1..=t)
    let filled = (rows - 1).saturating_mul(t).saturating_add(last);
    let arg = || format!("block_size={t} with stride={stride}");
    let fix = "lower block_size (it need not exceed the tokens) or raise stride";
    let cells = super::output_cells(rows, t, filled, arg, fix)?;
    let what = || format!("lm_windows: a {rows} x {t} int64 batch");
    let mut w = Windows {
        input_ids: super::try_filled(cells, pad_id, what)?,
        targets: super::try_filled(cells, super::pack::IGNORE, what)?,
        attention_mask: super::try_filled(cells, 0, what)?,
        rows,
    };
    let mut scored = 0usize; // input positions whose target is already scored
    for r in 0..rows {
        let b = r * stride;
        let n = t.min(m - b);
        let o = r * t;
        w.input_ids[o..o + n].copy_from_slice(&stream[b..b + n]);
        w.attention_mask[o..o + n].fill(1);
        for j in 0..n {
            if b + j >= scored {
                w.targets[o + j] = stream[b + j + 1];
            }
        }
        scored = b + n;
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_with_eos() {
        let a = [1i64, 2, 3];
        let b = [4i64, 5];
        let p = pack(&[Row::I64(&a), Row::I64(&b)], 3, Some(9), false, 0, false).unwrap();
        // stream: 1 2 3 9 4 5 9 (7 tokens, 6 targets) -> 2 rows of 3
        assert_eq!(p.rows, 2);
        assert_eq!(p.input_ids, vec![1, 2, 3, 9, 4, 5]);
        assert_eq!(p.targets, vec![2, 3, 9, 4, 5, 9]);
        assert_eq!(p.position_ids, vec![0, 1, 2, 0, 0, 1]);
        assert_eq!(p.doc_ids, vec![0, 0, 0, 0, 1, 1]);
        let m = pack(&[Row::I64(&a), Row::I64(&b)], 3, Some(9), false, 0, true).unwrap();
        assert_eq!(m.targets, vec![2, 3, 9, IGNORE, 5, 9]);
    }

    #[test]
    fn windows_score_each_target_once() {
        let s: Vec<i64> = (10..20).collect();
        let w = windows(Row::I64(&s), 4, 2, 0).unwrap();
        let scored: Vec<i64> = w.targets.iter().copied().filter(|&x| x != IGNORE).collect();
        assert_eq!(scored, (11..20).collect::<Vec<_>>());
        assert_eq!(&w.input_ids[..4], &[10, 11, 12, 13]);
        assert_eq!(&w.input_ids[4..8], &[12, 13, 14, 15]);
        assert_eq!(&w.targets[4..8], &[IGNORE, IGNORE, 15, 16]);
        assert_eq!(w.rows, 4);
        for (t, stride, rows) in [(1, 1, 9), (9, 9, 1), (10, 3, 1), (3, 3, 3), (4, 3, 3)] {
            let w = windows(Row::I64(&s), t, stride, 0).unwrap();
            assert_eq!(w.rows, rows, "t={t} stride={stride}");
            let scored: Vec<i64> = w.targets.iter().copied().filter(|&x| x != IGNORE).collect();
            assert_eq!(scored, (11..20).collect::<Vec<_>>());
        }
    }

    #[test]
    fn huge_sizes_are_errors_not_aborts() {
        let a = [1i64, 2, 3];
        let docs = [Row::I64(&a), Row::I64(&a)];
        for t in [1usize << 31, 1 << 40, 1 << 61, 1 << 62, usize::MAX] {
            for keep_last in [false, true] {
                let e = pack(&docs, t, Some(0), keep_last, 0, false).unwrap_err().to_string();
                assert!(e.contains(&format!("block_size={t}")), "{e}");
            }
            let e = windows(Row::I64(&a), t, t, 0).unwrap_err().to_string();
            assert!(e.contains(&format!("block_size={t}")), "{e}");
        }
        // A block_size above the tokens but within the padding allowance still works.
        let p = pack(&docs, 4096, Some(0), true, 0, false).unwrap();
        assert_eq!((p.rows, p.input_ids.len()), (1, 4096));
        assert_eq!(pack(&docs, 4096, Some(0), false, 0, false).unwrap().rows, 0);
    }
}
