//! Bindings for the batching layer (`ferrolm.data`).

use std::path::PathBuf;

use numpy::{IntoPyArray, PyArray1, PyArray2, PyReadonlyArray1};
use pyo3::exceptions::{PyMemoryError, PyValueError};
use pyo3::prelude::*;
use rayon::prelude::*;

use super::convert::{self, run, Sequences};
use super::tokenizer::CoreTokenizer;
use crate::data::{bucket, pack, pad, shard, Row};
use crate::parallel;

pub(super) type Arr2<'py, T> = Bound<'py, PyArray2<T>>;
pub(super) type Arr1<'py, T> = Bound<'py, PyArray1<T>>;

pub(super) fn to2<'py, T: numpy::Element>(
    py: Python<'py>,
    v: Vec<T>,
    rows: usize,
    cols: usize,
) -> PyResult<Arr2<'py, T>> {
    // One array object that owns the Vec (no copy, no reshape view).
    let a = numpy::ndarray::Array2::from_shape_vec((rows, cols), v)
        .map_err(|e| PyValueError::new_err(format!("internal shape error: {e}")))?;
    Ok(a.into_pyarray(py))
}

/// A core result as a Python one: an allocation the system refused is `MemoryError`, the
/// rest maps as everywhere (`py/errors.rs`).
fn core<T>(r: crate::Result<T>) -> PyResult<T> {
    r.map_err(
        |e| if e.is_out_of_memory() { PyMemoryError::new_err(e.to_string()) } else { e.into() },
    )
}

pub(super) fn bytes_of(rows: &[Row<'_>]) -> usize {
    rows.iter().map(|r| r.len() * 8).sum()
}

fn parse_truncation(t: &str) -> PyResult<pad::Truncation> {
    match t {
        "error" => Ok(pad::Truncation::Error),
        "right" => Ok(pad::Truncation::Right),
        "left" => Ok(pad::Truncation::Left),
        other => Err(PyValueError::new_err(format!(
            "truncation must be 'error', 'right' or 'left', got {other:?}"
        ))),
    }
}

/// Pads sequences; returns (ids, mask, lengths) with ids/mask of `dtype` ("int64" or "int32").
#[pyfunction]
#[pyo3(signature = (sequences, pad_id, max_length, left, truncation, pad_to_multiple_of, dtype))]
// One parameter per argument of the Python-visible `_core` signature.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub fn pad_batch<'py>(
    py: Python<'py>,
    sequences: &Bound<'py, PyAny>,
    pad_id: i64,
    max_length: Option<usize>,
    left: bool,
    truncation: &str,
    pad_to_multiple_of: Option<usize>,
    dtype: &str,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>, Arr1<'py, i64>)> {
    let seqs = Sequences::many(sequences)?;
    let rows = seqs.rows();
    let spec = pad::PadSpec {
        pad_id,
        max_length,
        side: if left { pad::Side::Left } else { pad::Side::Right },
        truncation: parse_truncation(truncation)?,
        pad_to_multiple_of,
    };
    let work = bytes_of(&rows);
    match dtype {
        "int64" => {
            let p = core(run(py, work, || pad::pad::<i64>(&rows, &spec)))?;
            Ok((
                to2(py, p.ids, p.rows, p.cols)?.into_any(),
                to2(py, p.mask, p.rows, p.cols)?.into_any(),
                PyArray1::from_vec(py, p.lengths),
            ))
        }
        "int32" => {
            let p = core(run(py, work, || pad::pad::<i32>(&rows, &spec)))?;
            Ok((
                to2(py, p.ids, p.rows, p.cols)?.into_any(),
                to2(py, p.mask, p.rows, p.cols)?.into_any(),
                PyArray1::from_vec(py, p.lengths),
            ))
        }
        other => {
            Err(PyValueError::new_err(format!("dtype must be 'int64' or 'int32', got {other:?}")))
        }
    }
}

/// Packs documents; returns (input_ids, targets, position_ids, doc_ids), each (N, block_size).
#[pyfunction]
#[pyo3(signature = (
    documents, block_size, eos_id, keep_last, pad_id, mask_cross_document, num_threads=None
))]
// One parameter per argument of the Python-visible `_core` signature.
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
pub fn pack_documents<'py>(
    py: Python<'py>,
    documents: &Bound<'py, PyAny>,
    block_size: i64,
    eos_id: Option<i64>,
    keep_last: bool,
    pad_id: i64,
    mask_cross_document: bool,
    num_threads: Option<usize>,
) -> PyResult<(Arr2<'py, i64>, Arr2<'py, i64>, Arr2<'py, i64>, Arr2<'py, i64>)> {
    if block_size <= 0 {
        return Err(PyValueError::new_err(format!(
            "block_size must be positive, got {block_size}"
        )));
    }
    let seqs = Sequences::many(documents)?;
    let rows = seqs.rows();
    let t = block_size as usize;
    let n = parallel::resolve_threads(num_threads);
    let p = core(run(py, bytes_of(&rows), || {
        parallel::install(n, || {
            pack::pack(&rows, t, eos_id, keep_last, pad_id, mask_cross_document)
        })
    }))?;
    Ok((
        to2(py, p.input_ids, p.rows, t)?,
        to2(py, p.targets, p.rows, t)?,
        to2(py, p.position_ids, p.rows, t)?,
        to2(py, p.doc_ids, p.rows, t)?,
    ))
}

/// Language-model windows; returns (input_ids, targets, attention_mask), each (N, block_size).
#[pyfunction]
#[pyo3(signature = (tokens, block_size, stride, pad_id))]
pub fn lm_windows<'py>(
    py: Python<'py>,
    tokens: &Bound<'py, PyAny>,
    block_size: i64,
    stride: i64,
    pad_id: i64,
) -> PyResult<(Arr2<'py, i64>, Arr2<'py, i64>, Arr2<'py, i64>)> {
    if block_size <= 0 {
        return Err(PyValueError::new_err(format!(
            "block_size must be positive, got {block_size}"
        )));
    }
    if stride <= 0 {
        return Err(PyValueError::new_err(format!("stride must be positive, got {stride}")));
    }
    let seqs = Sequences::one(tokens.clone(), "tokens")?;
    let row = seqs.rows()[0];
    let t = block_size as usize;
    let w = core(run(py, row.len() * 8, || pack::windows(row, t, stride as usize, pad_id)))?;
    Ok((
        to2(py, w.input_ids, w.rows, t)?,
        to2(py, w.targets, w.rows, t)?,
        to2(py, w.attention_mask, w.rows, t)?,
    ))
}

/// Length-bucketed batches; returns (flat indices, offsets).
#[pyfunction]
#[pyo3(signature = (lengths, order, bucket_size, batch_size, max_tokens, drop_last))]
pub fn bucket_batches<'py>(
    py: Python<'py>,
    lengths: PyReadonlyArray1<'py, u32>,
    order: PyReadonlyArray1<'py, u32>,
    bucket_size: usize,
    batch_size: Option<usize>,
    max_tokens: Option<u64>,
    drop_last: bool,
) -> PyResult<(Arr1<'py, u32>, Arr1<'py, u64>)> {
    let l = lengths.as_slice()?;
    let o = order.as_slice()?;
    let (flat, off) = core(run(py, l.len() * 16, || {
        bucket::bucket_batches(l, o, bucket_size, batch_size, max_tokens, drop_last)
    }))?;
    Ok((PyArray1::from_vec(py, flat), PyArray1::from_vec(py, off)))
}

/// Validates a shard and returns (itemsize, count).
#[pyfunction]
pub fn shard_info(path: PathBuf) -> PyResult<(usize, u64)> {
    let s = shard::Shard::open(&path)?;
    Ok((s.dtype().itemsize(), s.len() as u64))
}

/// A memory-mapped shard that gathers blocks.
#[pyclass(module = "ferrolm._core", frozen)]
pub struct ShardReader {
    inner: shard::Shard,
}

#[pymethods]
impl ShardReader {
    #[new]
    fn new(path: PathBuf) -> PyResult<Self> {
        Ok(ShardReader { inner: shard::Shard::open(&path)? })
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    #[getter]
    fn itemsize(&self) -> usize {
        self.inner.dtype().itemsize()
    }

    /// (len(starts), length) int64 ids starting at each start.
    fn gather<'py>(
        &self,
        py: Python<'py>,
        starts: Vec<u64>,
        length: usize,
    ) -> PyResult<Arr2<'py, i64>> {
        let n = starts.len();
        let work = n.saturating_mul(length).saturating_mul(8);
        let v = core(run(py, work, || self.inner.gather(&starts, length)))?;
        to2(py, v, n, length)
    }
}

/// Writes token shards from texts or files, encoding in parallel with a tokenizer.
#[pyclass(module = "ferrolm._core")]
pub struct ShardSink {
    dir: PathBuf,
    prefix: String,
    dtype: shard::Dtype,
    max_tokens: u64,
    eos: Option<u32>,
    current: Option<shard::ShardWriter>,
    written: Vec<PathBuf>,
    tokens: u64,
}

impl ShardSink {
    fn push_docs(&mut self, docs: Vec<Vec<u32>>) -> crate::Result<()> {
        for d in docs {
            if self.current.is_none() {
                let path = self.dir.join(format!("{}_{:05}.bin", self.prefix, self.written.len()));
                self.current = Some(shard::ShardWriter::create(&path, self.dtype)?);
            }
            let w = self.current.as_mut().expect("created above");
            w.append(&d)?;
            if let Some(e) = self.eos {
                w.append(&[e])?;
            }
            self.tokens += d.len() as u64 + u64::from(self.eos.is_some());
            if w.count() >= self.max_tokens {
                let done = self.current.take().expect("present").finish()?;
                self.written.push(done);
            }
        }
        Ok(())
    }
}

#[pymethods]
impl ShardSink {
    #[new]
    #[pyo3(signature = (directory, prefix, itemsize, max_tokens, eos_id))]
    fn new(
        directory: PathBuf,
        prefix: String,
        itemsize: usize,
        max_tokens: u64,
        eos_id: Option<u32>,
    ) -> PyResult<Self> {
        let dtype = match itemsize {
            2 => shard::Dtype::U16,
            4 => shard::Dtype::U32,
            other => {
                return Err(PyValueError::new_err(format!("itemsize must be 2 or 4, got {other}")))
            }
        };
        if max_tokens == 0 {
            return Err(PyValueError::new_err("max_tokens_per_shard must be positive"));
        }
        Ok(ShardSink {
            dir: directory,
            prefix,
            dtype,
            max_tokens,
            eos: eos_id,
            current: None,
            written: Vec::new(),
            tokens: 0,
        })
    }

    /// Encodes texts (ordinary text: special tokens are not parsed) and appends them.
    #[pyo3(signature = (tokenizer, texts, num_threads=None))]
    fn add_texts(
        &mut self,
        py: Python<'_>,
        tokenizer: &CoreTokenizer,
        texts: &Bound<'_, PyAny>,
        num_threads: Option<usize>,
    ) -> PyResult<()> {
        let items = convert::str_items(texts)?;
        let texts = convert::texts(&items)?;
        let tok = tokenizer.core();
        let n = parallel::resolve_threads(num_threads);
        py.detach(|| -> crate::Result<()> {
            let docs = parallel::install(n, || tok.encode_batch(&texts, &[]))?;
            self.push_docs(docs)
        })?;
        Ok(())
    }

    /// Reads UTF-8 files, encodes them in parallel and appends them (one document per file).
    #[pyo3(signature = (tokenizer, paths, num_threads=None))]
    fn add_files(
        &mut self,
        py: Python<'_>,
        tokenizer: &CoreTokenizer,
        paths: Vec<PathBuf>,
        num_threads: Option<usize>,
    ) -> PyResult<()> {
        let tok = tokenizer.core();
        let n = parallel::resolve_threads(num_threads);
        py.detach(|| -> crate::Result<()> {
            let docs = parallel::install(n, || {
                paths
                    .par_iter()
                    .map(|p| {
                        let text = crate::bpe::train::read_utf8(p)?;
                        tok.encode_ordinary(&text)
                    })
                    .collect::<crate::Result<Vec<_>>>()
            })?;
            self.push_docs(docs)
        })?;
        Ok(())
    }

    #[getter]
    fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Drops the open shard (its temporary file is removed); finished shards stay.
    fn abort(&mut self) {
        self.current = None;
    }

    /// Finishes the open shard and returns the paths written.
    fn close(&mut self) -> PyResult<Vec<PathBuf>> {
        if let Some(w) = self.current.take() {
            if w.count() > 0 {
                self.written.push(w.finish()?);
            }
        }
        Ok(std::mem::take(&mut self.written))
    }
}
