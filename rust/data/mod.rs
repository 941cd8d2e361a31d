//! Batching: padding, length bucketing, packing, language-model windows and token shards.
//!
//! Every function takes token rows as [`Rows`] (borrowed slices of any integer type the
//! callers hold: numpy arrays, shards, Python lists) and returns owned flat buffers that the
//! bindings hand to numpy without a copy.

pub mod bucket;
pub mod pack;
pub mod pad;
pub mod shard;

use crate::Error;

/// One row of token ids, borrowed in its source integer type.
#[derive(Debug, Clone, Copy)]
pub enum Row<'a> {
    I64(&'a [i64]),
    I32(&'a [i32]),
    U32(&'a [u32]),
    U16(&'a [u16]),
    U8(&'a [u8]),
}

impl Row<'_> {
    /// Number of ids.
    #[inline]
    pub fn len(&self) -> usize {
        match self {
            Row::I64(s) => s.len(),
            Row::I32(s) => s.len(),
            Row::U32(s) => s.len(),
            Row::U16(s) => s.len(),
            Row::U8(s) => s.len(),
        }
    }

    /// Whether the row is empty.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The id at `i` (no bounds beyond the slice's own).
    #[inline(always)]
    pub fn get(&self, i: usize) -> i64 {
        match self {
            Row::I64(s) => s[i],
            Row::I32(s) => s[i] as i64,
            Row::U32(s) => s[i] as i64,
            Row::U16(s) => s[i] as i64,
            Row::U8(s) => s[i] as i64,
        }
    }

    /// Checks every id of `src[start..end]` is in `[0, max]`; else returns the first bad
    /// one's position and value.
    #[inline(always)]
    pub fn check(
        &self,
        start: usize,
        end: usize,
        max: i64,
    ) -> std::result::Result<(), (usize, i64)> {
        // One unsigned compare covers both ends (a negative id wraps to a huge value), and a
        // branch-free OR-reduction vectorises; the culprit is located only on failure. Types
        // whose every value fits skip the scan.
        macro_rules! go {
            ($s:expr, $ty:ty) => {{
                let src = &$s[start..end];
                if (<$ty>::MIN as i64) >= 0 && (<$ty>::MAX as i64) <= max {
                    return Ok(());
                }
                let m = max as u64;
                if !src.iter().fold(false, |bad, &v| bad | ((v as i64 as u64) > m)) {
                    return Ok(());
                }
                let i = src.iter().position(|&v| (v as i64 as u64) > m).unwrap_or(0);
                Err((start + i, src[i] as i64))
            }};
        }
        match self {
            Row::I64(s) => go!(s, i64),
            Row::I32(s) => go!(s, i32),
            Row::U32(s) => go!(s, u32),
            Row::U16(s) => go!(s, u16),
            Row::U8(s) => go!(s, u8),
        }
    }

    /// Appends ids `src[start..end]` (already checked to fit `T`) to `out`.
    #[inline(always)]
    pub fn extend_into<T: OutInt>(&self, start: usize, end: usize, out: &mut Vec<T>) {
        match self {
            Row::I64(s) => out.extend(s[start..end].iter().map(|&v| T::from_i64(v))),
            Row::I32(s) => out.extend(s[start..end].iter().map(|&v| T::from_i64(v as i64))),
            Row::U32(s) => out.extend(s[start..end].iter().map(|&v| T::from_i64(v as i64))),
            Row::U16(s) => out.extend(s[start..end].iter().map(|&v| T::from_i64(v as i64))),
            Row::U8(s) => out.extend(s[start..end].iter().map(|&v| T::from_i64(v as i64))),
        }
    }

    /// Copies ids `src[start..start + dst.len()]` into `dst`, checking each is in `[0, max]`.
    /// On a bad id returns its position in the row and its value.
    #[inline]
    pub fn copy_checked<T: OutInt>(
        &self,
        start: usize,
        dst: &mut [T],
        max: i64,
    ) -> std::result::Result<(), (usize, i64)> {
        macro_rules! go {
            ($s:expr) => {{
                let src = &$s[start..start + dst.len()];
                for (i, (d, &v)) in dst.iter_mut().zip(src).enumerate() {
                    let v = v as i64;
                    if v < 0 || v > max {
                        return Err((start + i, v));
                    }
                    *d = T::from_i64(v);
                }
                Ok(())
            }};
        }
        match self {
            Row::I64(s) => go!(s),
            Row::I32(s) => go!(s),
            Row::U32(s) => go!(s),
            Row::U16(s) => go!(s),
            Row::U8(s) => go!(s),
        }
    }
}

/// The integer types ferrolm writes ids as.
pub trait OutInt: Copy + Send + Sync + 'static {
    /// The largest id this type holds.
    const MAX: i64;
    /// Its name, for messages.
    const NAME: &'static str;
    /// Converts a value already checked to be in range.
    fn from_i64(v: i64) -> Self;
}

impl OutInt for i64 {
    const MAX: i64 = i64::MAX;
    const NAME: &'static str = "int64";
    #[inline(always)]
    fn from_i64(v: i64) -> Self {
        v
    }
}

impl OutInt for i32 {
    const MAX: i64 = i32::MAX as i64;
    const NAME: &'static str = "int32";
    #[inline(always)]
    fn from_i64(v: i64) -> Self {
        v as i32
    }
}

impl OutInt for u16 {
    const MAX: i64 = u16::MAX as i64;
    const NAME: &'static str = "uint16";
    #[inline(always)]
    fn from_i64(v: i64) -> Self {
        v as u16
    }
}

impl OutInt for u32 {
    const MAX: i64 = u32::MAX as i64;
    const NAME: &'static str = "uint32";
    #[inline(always)]
    fn from_i64(v: i64) -> Self {
        v as u32
    }
}

/// The error for an id outside `[0, max]`.
pub(crate) fn bad_id(row: usize, pos: usize, value: i64, max: i64, dtype: &str) -> Error {
    Error::value(format!(
        "sequence {row} has id {value} at position {pos}; ids must be in [0, {max}] for {dtype}"
    ))
}

/// Cells of padding an output may hold beyond the ids its input fills: 2^28 (2 GiB of int64 per
/// array). A size argument asking for more is a mistake (`max_length=2**40`), not a batch.
pub const MAX_PADDING: usize = 1 << 28;

/// The number of cells of a `(rows, cols)` output whose input fills `filled` of them, checked
/// before anything is allocated: the product must not overflow, and neither a row nor the
/// whole output may exceed `filled + MAX_PADDING`. `arg` names the size argument responsible
/// (`"max_length=1099511627776"`; built only on failure, off the hot path) and `fix` says what
/// to do.
pub(crate) fn output_cells(
    rows: usize,
    cols: usize,
    filled: usize,
    arg: impl FnOnce() -> String,
    fix: &str,
) -> Result<usize, Error> {
    let cap = filled.saturating_add(MAX_PADDING);
    match rows.checked_mul(cols) {
        Some(cells) if cells <= cap && cols <= cap => Ok(cells),
        cells => {
            let cells = cells.map_or_else(|| "more than 2**64".to_string(), |c| c.to_string());
            let arg = arg();
            Err(Error::value(format!(
                "{arg} asks for a {rows} x {cols} output ({cells} cells) but the input fills \
                 only {filled}; at most {MAX_PADDING} cells of padding are allowed; {fix}"
            )))
        }
    }
}

/// A vector of `n` copies of `fill`, or an out-of-memory error naming `what()` (never an
/// abort).
pub(crate) fn try_filled<T: Clone>(
    n: usize,
    fill: T,
    what: impl FnOnce() -> String,
) -> Result<Vec<T>, Error> {
    let mut v = try_with_capacity(n, what)?;
    v.resize(n, fill);
    Ok(v)
}

/// An empty vector with room for `n` values, or an out-of-memory error naming `what()`.
pub(crate) fn try_with_capacity<T>(
    n: usize,
    what: impl FnOnce() -> String,
) -> Result<Vec<T>, Error> {
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|_| Error::out_of_memory(&what(), n.saturating_mul(std::mem::size_of::<T>())))?;
    Ok(v)
}

#[cfg(test)]
mod size_tests {
    use super::*;

    #[test]
    fn output_cells_refuses_overflow_and_padding() {
        let name = |s: &str| {
            let s = s.to_string();
            move || s
        };
        assert_eq!(output_cells(2, 3, 6, name("x=3"), "lower x").unwrap(), 6);
        assert_eq!(output_cells(0, 5, 1, name("x=5"), "lower x").unwrap(), 0);
        let e = output_cells(1 << 40, 1 << 40, 10, name("max_length=1099511627776"), "lower it");
        assert!(e.unwrap_err().to_string().contains("max_length=1099511627776"));
        assert!(output_cells(0, 1 << 61, 10, name("block_size"), "").is_err());
        assert!(output_cells(4, MAX_PADDING, 10, name("block_size"), "").is_err());
        let e = try_filled(usize::MAX / 8, 0i64, name("test")).unwrap_err();
        assert!(e.is_out_of_memory(), "{e}");
        assert!(try_with_capacity::<i64>(usize::MAX / 8, name("test")).is_err());
    }
}
