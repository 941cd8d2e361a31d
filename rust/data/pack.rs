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
    let mut start = Vec::with_capacity(docs.len() + 1);
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
    let mut p = Packed {
        input_ids: vec![pad_id; rows * t],
        targets: vec![IGNORE; rows * t],
        position_ids: vec![0; rows * t],
        doc_ids: vec![-1; rows * t],
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
    let mut stream = vec![0i64; l];
    tokens
        .copy_checked(0, &mut stream, i64::MAX)
        .map_err(|(p, v)| bad_id(0, p, v, i64::MAX, "int64"))?;
    let t = block_size;
    // Targets are stream[1..l]; window k starts at k*stride and scores targets up to
    // min(k*stride + t, l - 1) (exclusive, in input positions).
    let mut w = Windows::default();
    let mut scored = 0usize; // input positions whose target is already scored
    let mut k = 0usize;
    loop {
        let b = k * stride;
        let n = t.min(l - 1 - b);
        let o = w.rows * t;
        w.input_ids.resize(o + t, pad_id);
        w.targets.resize(o + t, super::pack::IGNORE);
        w.attention_mask.resize(o + t, 0);
        w.input_ids[o..o + n].copy_from_slice(&stream[b..b + n]);
        w.attention_mask[o..o + n].fill(1);
        for j in 0..n {
            if b + j >= scored {
                w.targets[o + j] = stream[b + j + 1];
            }
        }
        scored = b + n;
        w.rows += 1;
        if b + n >= l - 1 {
            break;
        }
        k += 1;
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
    }
}
