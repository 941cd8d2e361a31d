//! Length bucketing: batches of sequences of similar length.

use crate::{Error, Result};

/// Forms batches from `order` (a permutation of sequence indices, shuffled by the caller):
/// `order` is cut into buckets of `bucket_size`; within a bucket, indices are sorted by length
/// (stable, so ties keep their shuffled order) and taken greedily into batches of at most
/// `batch_size` sequences and, with `max_tokens`, at most `max_tokens` padded tokens (longest
/// length in the batch × batch size). A sequence longer than `max_tokens` forms a batch alone.
/// Returns the batches as (flat indices, offsets), in bucket order; the caller shuffles them.
pub fn bucket_batches(
    lengths: &[u32],
    order: &[u32],
    bucket_size: usize,
    batch_size: Option<usize>,
    max_tokens: Option<u64>,
    drop_last: bool,
) -> Result<(Vec<u32>, Vec<u64>)> {
    if batch_size.is_none() && max_tokens.is_none() {
        return Err(Error::value("give batch_size, max_tokens or both"));
    }
    if batch_size == Some(0) || max_tokens == Some(0) || bucket_size == 0 {
        return Err(Error::value("batch_size, max_tokens and bucket_size must be positive"));
    }
    if order.len() != lengths.len() {
        return Err(Error::value(format!(
            "order has {} indices for {} lengths",
            order.len(),
            lengths.len()
        )));
    }
    let mut seen = vec![false; lengths.len()];
    for &i in order {
        match seen.get_mut(i as usize) {
            Some(s) if !*s => *s = true,
            _ => {
                return Err(Error::value(format!(
                    "order is not a permutation of 0..{} (index {i})",
                    lengths.len()
                )))
            }
        }
    }
    let cap = batch_size.unwrap_or(usize::MAX);
    let mut flat = Vec::with_capacity(order.len());
    let mut offsets = vec![0u64];
    let mut bucket: Vec<u32> = Vec::with_capacity(bucket_size.min(order.len()));
    for chunk in order.chunks(bucket_size) {
        bucket.clear();
        bucket.extend_from_slice(chunk);
        bucket.sort_by_key(|&i| lengths[i as usize]);
        let mut start = flat.len();
        let mut longest = 0u64;
        for &i in &bucket {
            let len = lengths[i as usize] as u64;
            let n = flat.len() - start;
            let new_longest = longest.max(len);
            let over_tokens = max_tokens.is_some_and(|m| new_longest * (n as u64 + 1) > m);
            if n > 0 && (n >= cap || over_tokens) {
                offsets.push(flat.len() as u64);
                start = flat.len();
                longest = 0;
            }
            flat.push(i);
            longest = longest.max(len);
        }
        if flat.len() > start {
            let n = flat.len() - start;
            let short = n < cap && batch_size.is_some() && max_tokens.is_none();
            if drop_last && short {
                flat.truncate(start);
            } else {
                offsets.push(flat.len() as u64);
            }
        }
    }
    Ok((flat, offsets))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_by_count_and_tokens() {
        let lengths = [5u32, 1, 3, 2, 4, 6];
        let order: Vec<u32> = (0..6).collect();
        let (flat, off) = bucket_batches(&lengths, &order, 6, Some(2), None, false).unwrap();
        assert_eq!(flat, vec![1, 3, 2, 4, 0, 5]);
        assert_eq!(off, vec![0, 2, 4, 6]);
        let (flat, off) = bucket_batches(&lengths, &order, 6, None, Some(8), false).unwrap();
        // Sorted lengths 1 2 3 4 5 6, at most 8 padded tokens a batch: [1, 2] (2*2 = 4; adding
        // 3 gives 3*3 = 9 > 8), [3, 4] (4*2 = 8), then 5 and 6 alone.
        assert_eq!(flat, vec![1, 3, 2, 4, 0, 5]);
        assert_eq!(off, vec![0, 2, 4, 5, 6]);
    }

    #[test]
    fn rejects_bad_order() {
        assert!(bucket_batches(&[1, 2], &[0, 0], 2, Some(1), None, false).is_err());
        assert!(bucket_batches(&[1, 2], &[0, 1], 2, None, None, false).is_err());
    }
}
