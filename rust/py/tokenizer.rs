//! Bindings for the tokenizer and the trainer.

use std::os::raw::c_ulong;
use std::path::PathBuf;
use std::sync::Arc;

use numpy::{PyArray1, PyArray2, PyArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

use super::convert::{self, run};
use crate::bpe::{self, SpecialPolicy};
use crate::parallel;

/// The token ids as a Python list. Ints for every id are created once per tokenizer and shared
/// (an incref instead of an allocation per token: measured ~20% of encode time otherwise).
fn ids_to_list<'py>(
    py: Python<'py>,
    ids: &[u32],
    ints: &[Py<PyAny>],
) -> PyResult<Bound<'py, PyList>> {
    // SAFETY: PyList_New returns a new reference or NULL (checked); each slot is filled
    // exactly once with an owned reference (PyList_SetItem steals it) before the list escapes.
    unsafe {
        let list = ffi::PyList_New(ids.len() as ffi::Py_ssize_t);
        if list.is_null() {
            return Err(PyErr::fetch(py));
        }
        for (i, &id) in ids.iter().enumerate() {
            let obj = match ints.get(id as usize) {
                Some(o) => {
                    let p = o.as_ptr();
                    ffi::Py_IncRef(p);
                    p
                }
                None => ffi::PyLong_FromUnsignedLong(id as c_ulong),
            };
            if obj.is_null() {
                ffi::Py_DecRef(list);
                return Err(PyErr::fetch(py));
            }
            ffi::PyList_SetItem(list, i as ffi::Py_ssize_t, obj);
        }
        Ok(Bound::from_owned_ptr(py, list).cast_into_unchecked())
    }
}

fn policy_from(p: &[u8], n: usize) -> PyResult<Vec<SpecialPolicy>> {
    if p.len() != n {
        return Err(PyValueError::new_err(format!(
            "special-token policy needs {n} entries, got {}",
            p.len()
        )));
    }
    p.iter()
        .map(|&x| match x {
            0 => Ok(SpecialPolicy::Text),
            1 => Ok(SpecialPolicy::Allowed),
            2 => Ok(SpecialPolicy::Disallowed),
            _ => Err(PyValueError::new_err(format!(
                "special-token policy entry {x} is not 0, 1 or 2"
            ))),
        })
        .collect()
}

fn ids_from(ids: Vec<i64>) -> PyResult<Vec<u64>> {
    ids.into_iter()
        .map(|i| {
            u64::try_from(i).map_err(|_| {
                PyErr::from(crate::Error::UnknownId {
                    id: i as i128,
                    valid: "non-negative ids".into(),
                })
            })
        })
        .collect()
}

/// The native tokenizer behind `ferrolm.Tokenizer`.
#[pyclass(module = "ferrolm._core", frozen)]
pub struct CoreTokenizer {
    inner: Arc<bpe::Tokenizer>,
    ints: Vec<Py<PyAny>>,
}

impl CoreTokenizer {
    /// The core tokenizer (for other bindings).
    pub(crate) fn core(&self) -> &bpe::Tokenizer {
        &self.inner
    }

    fn wrap(py: Python<'_>, t: bpe::Tokenizer) -> PyResult<Self> {
        let n = t.n_vocab();
        let mut ints = Vec::with_capacity(n);
        for i in 0..n {
            ints.push((i as u64).into_pyobject(py)?.into_any().unbind());
        }
        Ok(CoreTokenizer { inner: Arc::new(t), ints })
    }
}

#[pymethods]
impl CoreTokenizer {
    /// From the bytes of a tiktoken rank file.
    #[staticmethod]
    fn from_tiktoken_bytes(
        py: Python<'_>,
        data: &[u8],
        pattern: &str,
        specials: Vec<(String, u32)>,
    ) -> PyResult<Self> {
        let data = data.to_vec();
        let pattern = pattern.to_string();
        let t = py.detach(move || -> crate::Result<_> {
            let ranks = bpe::formats::parse_tiktoken(&data)?;
            bpe::Tokenizer::new(bpe::Bpe::from_ranks(ranks)?, &pattern, specials)
        })?;
        Self::wrap(py, t)
    }

    /// From the text of an HF tokenizer.json.
    #[staticmethod]
    fn from_hf_json_str(py: Python<'_>, text: String) -> PyResult<Self> {
        let t = py.detach(move || bpe::formats::parse_hf_json(&text))?;
        Self::wrap(py, t)
    }

    /// From the tokenizer entries of a GGUF file's metadata (`tokenizer.ggml.*`).
    #[staticmethod]
    #[pyo3(signature = (model, pre, tokens, token_types, merges, scores=None, add_space_prefix=None))]
    #[allow(clippy::too_many_arguments)]
    fn from_gguf_vocab(
        py: Python<'_>,
        model: String,
        pre: Option<String>,
        tokens: Vec<String>,
        token_types: Option<Vec<i32>>,
        merges: Vec<String>,
        scores: Option<Vec<f32>>,
        add_space_prefix: Option<bool>,
    ) -> PyResult<Self> {
        let v =
            bpe::GgufVocab { model, pre, tokens, token_types, merges, scores, add_space_prefix };
        let t = py.detach(move || bpe::tokenizer_from_gguf(&v))?;
        Self::wrap(py, t)
    }

    /// From (bytes, rank) pairs with tiktoken's merge rule.
    #[staticmethod]
    fn from_ranks(
        py: Python<'_>,
        ranks: Vec<(Vec<u8>, u32)>,
        pattern: &str,
        specials: Vec<(String, u32)>,
    ) -> PyResult<Self> {
        let pattern = pattern.to_string();
        let t = py.detach(move || {
            bpe::Tokenizer::new(bpe::Bpe::from_ranks(ranks)?, &pattern, specials)
        })?;
        Self::wrap(py, t)
    }

    /// From tokens by id and a merge list, with HF's merge rule.
    #[staticmethod]
    fn from_merges(
        py: Python<'_>,
        tokens: Vec<Option<Vec<u8>>>,
        merges: Vec<(u32, u32)>,
        pattern: &str,
        specials: Vec<(String, u32)>,
    ) -> PyResult<Self> {
        let pattern = pattern.to_string();
        let t = py.detach(move || {
            let tokens = tokens.into_iter().map(|t| t.map(Vec::into_boxed_slice)).collect();
            bpe::Tokenizer::new(bpe::Bpe::from_merges(tokens, merges)?, &pattern, specials)
        })?;
        Self::wrap(py, t)
    }

    fn to_hf_json(&self, py: Python<'_>) -> PyResult<String> {
        let t = Arc::clone(&self.inner);
        Ok(py.detach(move || bpe::formats::dump_hf_json(&t))?)
    }

    fn to_tiktoken(&self, py: Python<'_>) -> String {
        let t = Arc::clone(&self.inner);
        py.detach(move || bpe::formats::dump_tiktoken(&t))
    }

    /// "ranks" (tiktoken's rule) or "merges" (HF's rule).
    #[getter]
    fn merge_rule(&self) -> &'static str {
        match self.inner.bpe().rule {
            bpe::MergeRule::Ranks => "ranks",
            bpe::MergeRule::Merges => "merges",
        }
    }

    #[getter]
    fn pattern(&self) -> &str {
        self.inner.pattern()
    }

    /// The pre-tokenizer patterns: one, or the stages of a llama.cpp-style chain.
    #[getter]
    fn patterns(&self) -> Vec<String> {
        self.inner.patterns().to_vec()
    }

    #[getter]
    fn specials(&self) -> Vec<(String, u32)> {
        self.inner.specials().to_vec()
    }

    #[getter]
    fn n_vocab(&self) -> usize {
        self.inner.n_vocab()
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    /// The merge list as id pairs, in rank order.
    fn merges(&self, py: Python<'_>) -> Vec<(u32, u32)> {
        let t = Arc::clone(&self.inner);
        py.detach(move || t.bpe().merge_list())
    }

    fn encode_ordinary<'py>(
        &self,
        py: Python<'py>,
        text: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyList>> {
        let text = convert::text(text, "text")?;
        let ids = run(py, text.len(), || self.inner.encode_ordinary(&text))?;
        ids_to_list(py, &ids, &self.ints)
    }

    fn encode<'py>(
        &self,
        py: Python<'py>,
        text: &Bound<'py, PyAny>,
        policy: &[u8],
    ) -> PyResult<Bound<'py, PyList>> {
        let policy = policy_from(policy, self.inner.specials().len())?;
        let text = convert::text(text, "text")?;
        let ids = run(py, text.len(), || self.inner.encode(&text, &policy))?;
        ids_to_list(py, &ids, &self.ints)
    }

    fn encode_to_numpy<'py>(
        &self,
        py: Python<'py>,
        text: &Bound<'py, PyAny>,
        policy: &[u8],
    ) -> PyResult<Bound<'py, PyArray1<u32>>> {
        let policy = policy_from(policy, self.inner.specials().len())?;
        let text = convert::text(text, "text")?;
        let ids = run(py, text.len(), || self.inner.encode(&text, &policy))?;
        Ok(PyArray1::from_vec(py, ids))
    }

    #[pyo3(signature = (texts, policy, num_threads=None))]
    fn encode_batch<'py>(
        &self,
        py: Python<'py>,
        texts: &Bound<'py, PyAny>,
        policy: &[u8],
        num_threads: Option<usize>,
    ) -> PyResult<Bound<'py, PyList>> {
        let policy = policy_from(policy, self.inner.specials().len())?;
        let items = convert::str_items(texts)?;
        let texts = convert::texts(&items)?;
        let n = parallel::resolve_threads(num_threads);
        let all =
            py.detach(|| parallel::install(n, || self.inner.encode_batch(&texts, &policy)))?;
        // SAFETY: as in ids_to_list; each slot gets one owned reference.
        unsafe {
            let out = ffi::PyList_New(all.len() as ffi::Py_ssize_t);
            if out.is_null() {
                return Err(PyErr::fetch(py));
            }
            let out: Bound<'py, PyList> = Bound::from_owned_ptr(py, out).cast_into_unchecked();
            for (i, ids) in all.iter().enumerate() {
                let row = ids_to_list(py, ids, &self.ints)?;
                ffi::PyList_SetItem(out.as_ptr(), i as ffi::Py_ssize_t, row.into_ptr());
            }
            Ok(out)
        }
    }

    /// Encodes a batch into a (B, T) int64 array padded with `pad_id` (T = longest row, or
    /// `max_length` with truncation) and the (B,) int64 lengths after truncation.
    #[pyo3(signature = (texts, policy, pad_id, max_length=None, left=false, num_threads=None))]
    // One parameter per argument of the Python-visible `_core` signature.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn encode_batch_padded<'py>(
        &self,
        py: Python<'py>,
        texts: &Bound<'py, PyAny>,
        policy: &[u8],
        pad_id: i64,
        max_length: Option<usize>,
        left: bool,
        num_threads: Option<usize>,
    ) -> PyResult<(Bound<'py, PyArray2<i64>>, Bound<'py, PyArray1<i64>>)> {
        let policy = policy_from(policy, self.inner.specials().len())?;
        let items = convert::str_items(texts)?;
        let texts = convert::texts(&items)?;
        let n = parallel::resolve_threads(num_threads);
        let (flat, rows, cols, lens) = py.detach(|| -> crate::Result<_> {
            let all = parallel::install(n, || self.inner.encode_batch(&texts, &policy))?;
            let cols = match max_length {
                Some(m) => m,
                None => all.iter().map(Vec::len).max().unwrap_or(0),
            };
            let mut flat = vec![pad_id; all.len() * cols];
            let mut lens = Vec::with_capacity(all.len());
            for (r, ids) in all.iter().enumerate() {
                let k = ids.len().min(cols);
                let row = &mut flat[r * cols..(r + 1) * cols];
                let dst = if left { &mut row[cols - k..] } else { &mut row[..k] };
                for (d, &s) in dst.iter_mut().zip(&ids[..k]) {
                    *d = s as i64;
                }
                lens.push(k as i64);
            }
            Ok((flat, all.len(), cols, lens))
        })?;
        let arr = PyArray1::from_vec(py, flat).reshape([rows, cols])?;
        Ok((arr, PyArray1::from_vec(py, lens)))
    }

    fn decode_bytes<'py>(&self, py: Python<'py>, ids: Vec<i64>) -> PyResult<Bound<'py, PyBytes>> {
        let ids = ids_from(ids)?;
        let mut out = Vec::with_capacity(ids.len() * 4);
        py.detach(|| self.inner.decode_into(ids, &mut out))?;
        Ok(PyBytes::new(py, &out))
    }

    #[pyo3(signature = (batch, num_threads=None))]
    fn decode_bytes_batch<'py>(
        &self,
        py: Python<'py>,
        batch: Vec<Vec<i64>>,
        num_threads: Option<usize>,
    ) -> PyResult<Vec<Bound<'py, PyBytes>>> {
        use rayon::prelude::*;
        let batch = batch.into_iter().map(ids_from).collect::<PyResult<Vec<_>>>()?;
        let n = parallel::resolve_threads(num_threads);
        let outs = py.detach(|| {
            parallel::install(n, || {
                batch
                    .into_par_iter()
                    .map(|ids| {
                        let mut out = Vec::with_capacity(ids.len() * 4);
                        self.inner.decode_into(ids, &mut out).map(|_| out)
                    })
                    .collect::<crate::Result<Vec<_>>>()
            })
        })?;
        Ok(outs.iter().map(|b| PyBytes::new(py, b)).collect())
    }

    /// The bytes of token `id` (mergeable or special), or None.
    fn token_bytes<'py>(&self, py: Python<'py>, id: i64) -> Option<Bound<'py, PyBytes>> {
        let id = u32::try_from(id).ok()?;
        self.inner.token_bytes(id).map(|b| PyBytes::new(py, b))
    }

    /// The id of the token with exactly these bytes, or None.
    fn token_id(&self, b: &[u8]) -> Option<u32> {
        self.inner.token_id(b)
    }

    /// All token bytes by id (None for gaps), for building tables in Python.
    fn token_table<'py>(&self, py: Python<'py>) -> Vec<Option<Bound<'py, PyBytes>>> {
        (0..self.inner.n_vocab() as u32)
            .map(|i| self.inner.token_bytes(i).map(|b| PyBytes::new(py, b)))
            .collect()
    }

    /// Pieces of `text` as the model sees them (for inspection and tests).
    fn pre_tokenize(&self, py: Python<'_>, text: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
        let text = convert::text(text, "text")?;
        Ok(py.detach(|| self.inner.pieces(&text))?)
    }

    /// Whether this tokenizer runs HF's full pipeline (normalizers, decoders ...).
    #[getter]
    fn has_pipeline(&self) -> bool {
        self.inner.pipeline().is_some()
    }

    /// Each id's token string as HF shows it (pipeline tokenizers; None otherwise).
    fn vocab_strings(&self) -> Option<Vec<Option<String>>> {
        self.inner.pipeline().map(|p| p.token_strings().to_vec())
    }

    /// The ids the post-processor puts before and after a text.
    #[getter]
    fn post_ids(&self) -> (Vec<u32>, Vec<u32>) {
        let (a, b) = self.inner.post();
        (a.to_vec(), b.to_vec())
    }

    /// The text of `ids` (HF's decoders for a pipeline tokenizer).
    fn decode_text(&self, py: Python<'_>, ids: Vec<i64>, skip_special: bool) -> PyResult<String> {
        let ids = ids_from(ids)?
            .into_iter()
            .map(|i| {
                u32::try_from(i).map_err(|_| {
                    crate::Error::UnknownId {
                        id: i as i128,
                        valid: format!("0..{}", self.inner.n_vocab()),
                    }
                    .into()
                })
            })
            .collect::<PyResult<Vec<u32>>>()?;
        Ok(py.detach(|| self.inner.decode_text(&ids, skip_special))?)
    }
}

/// Counts the words of training data (the first phase of training).
#[pyclass(module = "ferrolm._core")]
pub struct WordCounter {
    inner: Option<bpe::train::WordCounter>,
}

impl WordCounter {
    fn get(&mut self) -> PyResult<&mut bpe::train::WordCounter> {
        self.inner.as_mut().ok_or_else(|| {
            PyValueError::new_err("this WordCounter was already turned into a Trainer")
        })
    }
}

#[pymethods]
impl WordCounter {
    #[new]
    fn new(pattern: &str) -> PyResult<Self> {
        Ok(WordCounter { inner: Some(bpe::train::WordCounter::new(pattern)?) })
    }

    #[pyo3(signature = (texts, num_threads=None))]
    fn add_texts(
        &mut self,
        py: Python<'_>,
        texts: &Bound<'_, PyAny>,
        num_threads: Option<usize>,
    ) -> PyResult<()> {
        let items = convert::str_items(texts)?;
        let texts = convert::texts(&items)?;
        let n = parallel::resolve_threads(num_threads);
        let c = self.get()?;
        py.detach(|| parallel::install(n, || c.add_texts(&texts)))?;
        Ok(())
    }

    /// Reads UTF-8 text files and counts their words.
    #[pyo3(signature = (paths, num_threads=None))]
    fn add_files(
        &mut self,
        py: Python<'_>,
        paths: Vec<PathBuf>,
        num_threads: Option<usize>,
    ) -> PyResult<()> {
        use rayon::prelude::*;
        let n = parallel::resolve_threads(num_threads);
        let c = self.get()?;
        py.detach(|| {
            parallel::install(n, || -> crate::Result<()> {
                let texts = paths
                    .par_iter()
                    .map(|p| bpe::train::read_utf8(p))
                    .collect::<crate::Result<Vec<String>>>()?;
                c.add_texts(&texts)
            })
        })?;
        Ok(())
    }

    #[getter]
    fn bytes_seen(&self) -> u64 {
        self.inner.as_ref().map_or(0, |c| c.bytes_seen())
    }

    #[getter]
    fn num_words(&self) -> usize {
        self.inner.as_ref().map_or(0, |c| c.num_words())
    }

    // The Python method `WordCounter.into_trainer`: pyo3 methods cannot take `self` by value.
    #[allow(clippy::wrong_self_convention)]
    fn into_trainer(
        &mut self,
        py: Python<'_>,
        vocab_size: usize,
        min_frequency: u64,
        specials: Vec<String>,
    ) -> PyResult<Trainer> {
        let c = self.inner.take().ok_or_else(|| {
            PyValueError::new_err("this WordCounter was already turned into a Trainer")
        })?;
        let t = py.detach(move || c.into_trainer(vocab_size, min_frequency, specials))?;
        Ok(Trainer { inner: Some(t) })
    }
}

/// The merge phase of training, stepped from Python so a progress bar can follow it.
#[pyclass(module = "ferrolm._core")]
pub struct Trainer {
    inner: Option<bpe::train::Trainer>,
}

impl Trainer {
    fn get(&mut self) -> PyResult<&mut bpe::train::Trainer> {
        self.inner
            .as_mut()
            .ok_or_else(|| PyValueError::new_err("this Trainer has already finished"))
    }
}

#[pymethods]
impl Trainer {
    /// Performs up to `max_steps` merges and returns how many it did (0 when done).
    fn step(&mut self, py: Python<'_>, max_steps: usize) -> PyResult<usize> {
        let t = self.get()?;
        Ok(py.detach(|| t.step(max_steps)))
    }

    #[getter]
    fn num_merges(&self) -> usize {
        self.inner.as_ref().map_or(0, |t| t.num_merges())
    }

    #[getter]
    fn target_merges(&self) -> usize {
        self.inner.as_ref().map_or(0, |t| t.target_merges())
    }

    #[getter]
    fn is_done(&self) -> bool {
        self.inner.as_ref().is_none_or(|t| t.is_done())
    }

    fn finish(&mut self, py: Python<'_>) -> PyResult<CoreTokenizer> {
        let t = self
            .inner
            .take()
            .ok_or_else(|| PyValueError::new_err("this Trainer has already finished"))?;
        let tok = py.detach(move || t.finish())?;
        CoreTokenizer::wrap(py, tok)
    }
}
