//! Padding a batch of sequences into a rectangle with an attention mask.

use super::{bad_id, OutInt, Row};
use crate::{Error, Result};

/// Which end padding (or truncation) applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Left,
    Right,
}

/// What to do with a sequence longer than `max_length`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truncation {
    /// Raise an error naming the sequence.
    Error,
    /// Keep the first `max_length` ids.
    Right,
    /// Keep the last `max_length` ids.
    Left,
}

/// How to pad.
#[derive(Debug, Clone, Copy)]
pub struct PadSpec {
    pub pad_id: i64,
    pub max_length: Option<usize>,
    pub side: Side,
    pub truncation: Truncation,
    pub pad_to_multiple_of: Option<usize>,
}

/// A padded batch: `ids` and `mask` are row-major `(rows, cols)`; `lengths` are the real
/// (kept) lengths.
#[derive(Debug)]
pub struct Padded<T> {
    pub ids: Vec<T>,
    pub mask: Vec<T>,
    pub lengths: Vec<i64>,
    pub rows: usize,
    pub cols: usize,
}

/// Pads `rows` into a `(B, T)` array of `T`-typed ids and a mask (1 real, 0 padding).
///
/// T is `max_length` when given (shorter rows padded, longer ones truncated or rejected), else
/// the longest row; then rounded up to `pad_to_multiple_of`.
pub fn pad<T: OutInt>(rows: &[Row<'_>], spec: &PadSpec) -> Result<Padded<T>> {
    // The loops are memory-bound copies, fills and range checks. With AVX2 (detected at run
    // time, never assumed) the 64-bit range check vectorises; with the single unsigned compare
    // in `Row::check` this took a 64 x 512 collate from 10.5 to 6.9 us.
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { pad_avx2(rows, spec) };
    }
    pad_impl(rows, spec)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn pad_avx2<T: OutInt>(rows: &[Row<'_>], spec: &PadSpec) -> Result<Padded<T>> {
    pad_impl(rows, spec)
}

#[inline(always)]
fn pad_impl<T: OutInt>(rows: &[Row<'_>], spec: &PadSpec) -> Result<Padded<T>> {
    if rows.is_empty() {
        return Err(Error::value("cannot pad an empty batch: got 0 sequences"));
    }
    if spec.pad_id < 0 || spec.pad_id > T::MAX {
        return Err(Error::value(format!(
            "pad_id={} does not fit {} (expected 0..={})",
            spec.pad_id,
            T::NAME,
            T::MAX
        )));
    }
    if let Some(i) = rows.iter().position(Row::is_empty) {
        return Err(Error::value(format!(
            "sequence {i} is empty; every sequence needs at least one id"
        )));
    }
    let longest = rows.iter().map(Row::len).max().unwrap_or(0);
    let mut cols = match spec.max_length {
        Some(0) => return Err(Error::value("max_length must be positive, got 0")),
        Some(m) => {
            if spec.truncation == Truncation::Error && longest > m {
                let i = rows.iter().position(|r| r.len() > m).unwrap_or(0);
                return Err(Error::value(format!(
                    "sequence {i} has {} ids, more than max_length={m}; pass truncation=True (or \
                     'left') to cut it, or raise max_length",
                    rows[i].len()
                )));
            }
            m
        }
        None => longest,
    };
    if let Some(k) = spec.pad_to_multiple_of {
        if k == 0 {
            return Err(Error::value("pad_to_multiple_of must be positive, got 0"));
        }
        cols = cols.div_ceil(k).checked_mul(k).ok_or_else(|| {
            Error::value(format!(
                "pad_to_multiple_of={k} rounds the width {cols} past 2**64; lower it"
            ))
        })?;
    }
    let n = rows.len();
    // The ids that survive truncation: what the input fills; the rest is padding.
    let filled = rows.iter().map(|r| r.len().min(cols)).sum();
    let arg = || match (spec.max_length, spec.pad_to_multiple_of) {
        (Some(m), Some(k)) => format!("max_length={m} with pad_to_multiple_of={k}"),
        (Some(m), None) => format!("max_length={m}"),
        (None, Some(k)) => format!("pad_to_multiple_of={k}"),
        (None, None) => format!("the longest sequence ({longest} ids)"),
    };
    let fix = "lower max_length / pad_to_multiple_of, or batch sequences of similar length \
               (BucketBatchSampler)";
    let total = super::output_cells(n, cols, filled, arg, fix)?;
    // Each output element is written once (no zero-fill then copy): measured 1.6x on a
    // 64 x 512 collate, which is bound by memory writes.
    let pad = T::from_i64(spec.pad_id);
    let (zero, one) = (T::from_i64(0), T::from_i64(1));
    let what = || format!("pad: a {n} x {cols} {} batch", T::NAME);
    let mut ids: Vec<T> = super::try_with_capacity(total, what)?;
    let mut mask: Vec<T> = super::try_with_capacity(total, what)?;
    let mut lengths = Vec::with_capacity(n);
    for (r, row) in rows.iter().enumerate() {
        let len = row.len();
        let keep = len.min(cols);
        // Which ids survive truncation.
        let src_start = if spec.truncation == Truncation::Left { len - keep } else { 0 };
        row.check(src_start, src_start + keep, T::MAX)
            .map_err(|(pos, v)| bad_id(r, pos, v, T::MAX, T::NAME))?;
        let fill = cols - keep;
        if spec.side == Side::Left {
            ids.extend(std::iter::repeat_n(pad, fill));
            mask.extend(std::iter::repeat_n(zero, fill));
        }
        row.extend_into(src_start, src_start + keep, &mut ids);
        mask.extend(std::iter::repeat_n(one, keep));
        if spec.side == Side::Right {
            ids.extend(std::iter::repeat_n(pad, fill));
            mask.extend(std::iter::repeat_n(zero, fill));
        }
        lengths.push(keep as i64);
    }
    Ok(Padded { ids, mask, lengths, rows: n, cols })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(max_length: Option<usize>, side: Side, truncation: Truncation) -> PadSpec {
        PadSpec { pad_id: 0, max_length, side, truncation, pad_to_multiple_of: None }
    }

    #[test]
    fn pads_right_and_left() {
        let a = [5i64, 6, 7];
        let b = [8u16];
        let rows = [Row::I64(&a), Row::U16(&b)];
        let p: Padded<i64> = pad(&rows, &spec(None, Side::Right, Truncation::Error)).unwrap();
        assert_eq!((p.rows, p.cols), (2, 3));
        assert_eq!(p.ids, vec![5, 6, 7, 8, 0, 0]);
        assert_eq!(p.mask, vec![1, 1, 1, 1, 0, 0]);
        let p: Padded<i32> = pad(&rows, &spec(Some(4), Side::Left, Truncation::Error)).unwrap();
        assert_eq!(p.ids, vec![0, 5, 6, 7, 0, 0, 0, 8]);
    }

    #[test]
    fn truncates_or_refuses() {
        let a = [1i64, 2, 3, 4];
        let rows = [Row::I64(&a)];
        assert!(pad::<i64>(&rows, &spec(Some(2), Side::Right, Truncation::Error)).is_err());
        let p: Padded<i64> = pad(&rows, &spec(Some(2), Side::Right, Truncation::Left)).unwrap();
        assert_eq!(p.ids, vec![3, 4]);
        let p: Padded<i64> = pad(&rows, &spec(Some(2), Side::Right, Truncation::Right)).unwrap();
        assert_eq!(p.ids, vec![1, 2]);
    }

    #[test]
    fn bad_ids_and_batches_are_errors() {
        let a = [1i64, -2];
        let e = pad::<i64>(&[Row::I64(&a)], &spec(None, Side::Right, Truncation::Error))
            .unwrap_err()
            .to_string();
        assert!(e.contains("sequence 0 has id -2 at position 1"), "{e}");
        let big = [3_000_000_000u32];
        let right = spec(None, Side::Right, Truncation::Error);
        assert!(pad::<i32>(&[Row::U32(&big)], &right).is_err());
        assert!(pad::<i64>(&[], &spec(None, Side::Right, Truncation::Error)).is_err());
        let empty: [i64; 0] = [];
        assert!(
            pad::<i64>(&[Row::I64(&empty)], &spec(None, Side::Right, Truncation::Error)).is_err()
        );
    }

    #[test]
    fn huge_sizes_are_errors_not_aborts() {
        let a = [1i64, 2, 3];
        let rows = [Row::I64(&a), Row::I64(&a)];
        for m in [1usize << 40, 1 << 61, usize::MAX] {
            let e = pad::<i64>(&rows, &spec(Some(m), Side::Right, Truncation::Error)).unwrap_err();
            assert!(e.to_string().contains(&format!("max_length={m}")), "{e}");
        }
        for k in [1usize << 40, 1 << 61, 1 << 63, usize::MAX] {
            let mut s = spec(None, Side::Left, Truncation::Error);
            s.pad_to_multiple_of = Some(k);
            let e = pad::<i32>(&rows, &s).unwrap_err();
            assert!(e.to_string().contains("pad_to_multiple_of="), "{e}");
        }
        let p: Padded<i64> = pad(&rows, &spec(Some(4096), Side::Right, Truncation::Error)).unwrap();
        assert_eq!((p.rows, p.cols), (2, 4096));
    }
}
