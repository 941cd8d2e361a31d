//! Python bindings: the private `ferrolm._core` module. Each binding extracts its arguments into
//! owned Rust values or read-only array views, runs the core with the GIL released (calls too
//! small to pay for it excepted, see `convert::run`), and returns Python objects; core errors
//! map to exceptions in one place (`errors.rs`). The public API is `python/ferrolm/`.

mod convert;
mod data;
mod errors;
mod kernels;
mod quant;
mod retrieval;
mod tokenizer;

use pyo3::prelude::*;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("GPT2_PATTERN", crate::bpe::GPT2_PATTERN)?;
    m.add("CL100K_PATTERN", crate::bpe::CL100K_PATTERN)?;
    m.add_class::<tokenizer::CoreTokenizer>()?;
    m.add_class::<tokenizer::WordCounter>()?;
    m.add_class::<tokenizer::Trainer>()?;
    m.add_function(wrap_pyfunction!(available_threads, m)?)?;
    m.add_function(wrap_pyfunction!(data::pad_batch, m)?)?;
    m.add_function(wrap_pyfunction!(data::pack_documents, m)?)?;
    m.add_function(wrap_pyfunction!(data::lm_windows, m)?)?;
    m.add_function(wrap_pyfunction!(data::bucket_batches, m)?)?;
    m.add_function(wrap_pyfunction!(data::shard_info, m)?)?;
    m.add_class::<data::ShardReader>()?;
    m.add_function(wrap_pyfunction!(kernels::rnn_forward, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::rnn_backward, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::attention_forward, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::attention_backward, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::decode_attention, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::dropout, m)?)?;
    m.add_function(wrap_pyfunction!(quant::quant_matmul, m)?)?;
    m.add_function(wrap_pyfunction!(quant::quant_dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(quant::quant_gather, m)?)?;
    m.add_function(wrap_pyfunction!(quant::quant_quantize, m)?)?;
    m.add_function(wrap_pyfunction!(quant::quant_isa, m)?)?;
    m.add_class::<quant::LlamaStepper>()?;
    m.add_class::<quant::QuantPacked>()?;
    m.add_class::<data::ShardSink>()?;
    m.add_class::<retrieval::Bm25Index>()?;
    Ok(())
}

/// The number of hardware threads.
#[pyfunction]
fn available_threads() -> usize {
    crate::parallel::available_threads()
}
