//! Okapi BM25 over token ids, for retrieving in-context demonstrations.
//!
//! Score of document d for query q (every query token counts, repeats included):
//! `Σ_t idf(t) · tf(t,d)·(k1+1) / (tf(t,d) + k1·(1 − b + b·|d|/avgdl))` with the
//! non-negative `idf(t) = ln(1 + (N − df(t) + 0.5) / (df(t) + 0.5))` (Lucene's). An inverted
//! index of postings keeps a query's cost proportional to the postings of its tokens, not to N.
//! Ties rank the lower document index first, so results are deterministic.

use rayon::prelude::*;
use rustc_hash::FxHashMap;

use crate::data::Row;
use crate::{Error, Result};

/// An inverted index over documents of token ids.
pub struct Index {
    postings: FxHashMap<i64, Vec<(u32, u32)>>,
    doc_len: Vec<u32>,
    avgdl: f64,
    k1: f64,
    b: f64,
}

impl Index {
    /// Indexes `docs`; `k1 >= 0`, `b` in `[0, 1]`.
    pub fn new(docs: &[Row<'_>], k1: f64, b: f64) -> Result<Self> {
        if !k1.is_finite() || k1 < 0.0 || !(0.0..=1.0).contains(&b) {
            return Err(Error::value(format!(
                "BM25 needs k1 >= 0 and b in [0, 1], got k1={k1}, b={b}"
            )));
        }
        if docs.len() > u32::MAX as usize {
            return Err(Error::value("too many documents for one BM25 index (at most 2^32 - 1)"));
        }
        let mut postings: FxHashMap<i64, Vec<(u32, u32)>> = FxHashMap::default();
        let mut doc_len = Vec::with_capacity(docs.len());
        let mut counts: FxHashMap<i64, u32> = FxHashMap::default();
        for (d, row) in docs.iter().enumerate() {
            counts.clear();
            for i in 0..row.len() {
                *counts.entry(row.get(i)).or_insert(0) += 1;
            }
            let mut terms: Vec<(i64, u32)> = counts.iter().map(|(&t, &c)| (t, c)).collect();
            terms.sort_unstable();
            for (t, c) in terms {
                postings.entry(t).or_default().push((d as u32, c));
            }
            doc_len.push(row.len().min(u32::MAX as usize) as u32);
        }
        let total: u64 = doc_len.iter().map(|&l| l as u64).sum();
        let avgdl = if doc_len.is_empty() { 0.0 } else { total as f64 / doc_len.len() as f64 };
        Ok(Index { postings, doc_len, avgdl, k1, b })
    }

    /// Number of documents.
    pub fn len(&self) -> usize {
        self.doc_len.len()
    }

    /// Whether there are no documents.
    pub fn is_empty(&self) -> bool {
        self.doc_len.is_empty()
    }

    fn idf(&self, df: usize) -> f64 {
        let n = self.doc_len.len() as f64;
        (1.0 + (n - df as f64 + 0.5) / (df as f64 + 0.5)).ln()
    }

    /// The score of every document for `query`.
    pub fn scores(&self, query: &Row<'_>) -> Vec<f64> {
        let mut acc = vec![0.0f64; self.doc_len.len()];
        let mut qtf: FxHashMap<i64, u32> = FxHashMap::default();
        for i in 0..query.len() {
            *qtf.entry(query.get(i)).or_insert(0) += 1;
        }
        let mut terms: Vec<(i64, u32)> = qtf.into_iter().collect();
        terms.sort_unstable(); // a fixed summation order: the same scores on every run
        let avg = if self.avgdl > 0.0 { self.avgdl } else { 1.0 };
        for (t, q) in terms {
            let Some(list) = self.postings.get(&t) else { continue };
            let w = q as f64 * self.idf(list.len());
            for &(d, tf) in list {
                let tf = tf as f64;
                let norm =
                    self.k1 * (1.0 - self.b + self.b * self.doc_len[d as usize] as f64 / avg);
                acc[d as usize] += w * tf * (self.k1 + 1.0) / (tf + norm);
            }
        }
        acc
    }

    /// The `k` best documents of each query, best first, as `(index, score)`; `exclude[q]`
    /// (if given and >= 0) is never returned for query q (the query's own position in the pool).
    pub fn top_k(
        &self,
        queries: &[Row<'_>],
        k: usize,
        exclude: Option<&[i64]>,
    ) -> Result<Vec<Vec<(u32, f64)>>> {
        if let Some(e) = exclude {
            if e.len() != queries.len() {
                return Err(Error::value(format!(
                    "exclude has {} entries for {} queries",
                    e.len(),
                    queries.len()
                )));
            }
        }
        Ok(queries
            .par_iter()
            .enumerate()
            .map(|(qi, q)| {
                let s = self.scores(q);
                let skip = exclude.map(|e| e[qi]).filter(|&x| x >= 0).map(|x| x as usize);
                let mut idx: Vec<u32> =
                    (0..s.len() as u32).filter(|&d| Some(d as usize) != skip).collect();
                let better =
                    |a: &u32, b: &u32| s[*b as usize].total_cmp(&s[*a as usize]).then(a.cmp(b));
                let take = k.min(idx.len());
                if take > 0 && take < idx.len() {
                    idx.select_nth_unstable_by(take - 1, better);
                    idx.truncate(take);
                }
                idx.sort_unstable_by(better);
                idx.truncate(take);
                idx.into_iter().map(|d| (d, s[d as usize])).collect()
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(v: &[Vec<i64>]) -> Vec<Row<'_>> {
        v.iter().map(|r| Row::I64(r)).collect()
    }

    #[test]
    fn matches_the_formula_and_ranks_deterministically() {
        let docs = vec![vec![1, 2, 3, 1], vec![2, 2, 4], vec![5], vec![1, 5, 5, 5, 6]];
        let idx = Index::new(&rows(&docs), 1.5, 0.75).unwrap();
        let q = vec![1i64, 5, 1];
        let s = idx.scores(&Row::I64(&q));
        let avgdl = 13.0 / 4.0;
        for (d, doc) in docs.iter().enumerate() {
            let mut want = 0.0;
            for &t in &q {
                let df = docs.iter().filter(|x| x.contains(&t)).count() as f64;
                let tf = doc.iter().filter(|&&x| x == t).count() as f64;
                let idf = (1.0 + (4.0 - df + 0.5) / (df + 0.5)).ln();
                want += idf * tf * 2.5 / (tf + 1.5 * (0.25 + 0.75 * doc.len() as f64 / avgdl));
            }
            assert!((s[d] - want).abs() < 1e-12, "doc {d}: {} vs {want}", s[d]);
        }
        let top = idx.top_k(&[Row::I64(&q)], 2, Some(&[3])).unwrap();
        assert!(top[0].iter().all(|&(d, _)| d != 3));
        assert_eq!(top[0].len(), 2);
        assert!(top[0][0].1 >= top[0][1].1);
        assert!(Index::new(&rows(&docs), -1.0, 0.5).is_err());
    }
}
