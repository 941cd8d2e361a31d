//! Byte-level BPE: character classes, pre-tokenization, the encoder, training and file formats.

pub mod chars;
pub mod formats;
pub mod gguf;
pub mod hf;
pub mod model;
pub mod pretokenize;
pub mod tokenizer;
pub mod train;

pub use gguf::{tokenizer_from_gguf, GgufVocab};
pub use model::{Bpe, MergeRule, WordOpts};
pub use pretokenize::{Splitter, CL100K_PATTERN, GPT2_PATTERN};
pub use tokenizer::{SpecialPolicy, Tokenizer};
