//! Bindings for in-context retrieval (`ferrolm.icl`): the BM25 index.

use numpy::PyArray1;
use pyo3::prelude::*;

use super::convert::{run, Sequences};
use super::data::{bytes_of, to2, Arr1, Arr2};
use crate::parallel;
use crate::retrieval::bm25;

/// A BM25 index over documents of token ids (see `retrieval::bm25`).
#[pyclass(module = "ferrolm._core", frozen)]
pub struct Bm25Index {
    inner: bm25::Index,
}

#[pymethods]
impl Bm25Index {
    #[new]
    fn new(py: Python<'_>, documents: &Bound<'_, PyAny>, k1: f64, b: f64) -> PyResult<Self> {
        let seqs = Sequences::many(documents)?;
        let rows = seqs.rows();
        let inner = run(py, bytes_of(&rows), || bm25::Index::new(&rows, k1, b))?;
        Ok(Bm25Index { inner })
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    /// (N,) float64 scores of every document for one query.
    fn scores<'py>(&self, py: Python<'py>, query: &Bound<'py, PyAny>) -> PyResult<Arr1<'py, f64>> {
        let q = Sequences::one(query.clone(), "query")?;
        let rows = q.rows();
        let s = run(py, self.inner.len() * 8, || self.inner.scores(&rows[0]));
        Ok(PyArray1::from_vec(py, s))
    }

    /// ((Q, k) int64 indices, -1 past the documents available; (Q, k) float64 scores).
    #[pyo3(signature = (queries, k, exclude=None, threads=None))]
    fn top_k<'py>(
        &self,
        py: Python<'py>,
        queries: &Bound<'py, PyAny>,
        k: usize,
        exclude: Option<Vec<i64>>,
        threads: Option<usize>,
    ) -> PyResult<(Arr2<'py, i64>, Arr2<'py, f64>)> {
        let seqs = Sequences::many(queries)?;
        let rows = seqs.rows();
        let threads = parallel::resolve_threads(threads);
        let ex = exclude.as_deref();
        let res = py.detach(|| parallel::install(threads, || self.inner.top_k(&rows, k, ex)))?;
        let q = res.len();
        let mut idx = vec![-1i64; q * k];
        let mut sc = vec![f64::NEG_INFINITY; q * k];
        for (qi, r) in res.iter().enumerate() {
            for (j, &(d, s)) in r.iter().enumerate() {
                idx[qi * k + j] = d as i64;
                sc[qi * k + j] = s;
            }
        }
        Ok((to2(py, idx, q, k)?, to2(py, sc, q, k)?))
    }
}
