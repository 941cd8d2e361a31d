//! The tokenizer stored in a GGUF file's metadata (`tokenizer.ggml.*`), as llama.cpp reads it
//! (`src/llama-vocab.cpp`). The caller reads the file (the Python side uses the `gguf` package)
//! and passes the arrays; everything is checked here before use.

use rustc_hash::FxHashMap;

use super::formats::bytelevel_to_bytes;
use super::model::Bpe;
use super::pretokenize::{llama_cpp_patterns, LLAMA_CPP_PRE_NAMES};
use super::tokenizer::Tokenizer;
use crate::{Error, Result};

/// `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
pub mod token_type {
    /// An ordinary vocabulary entry.
    pub const NORMAL: i32 = 1;
    /// The unknown token.
    pub const UNKNOWN: i32 = 2;
    /// A control token (`<|im_start|>`): special.
    pub const CONTROL: i32 = 3;
    /// A token added by the user (matched in text before BPE, as llama.cpp does).
    pub const USER_DEFINED: i32 = 4;
    /// A reserved, unused entry.
    pub const UNUSED: i32 = 5;
    /// A byte token (`<0x0A>`, SentencePiece vocabularies).
    pub const BYTE: i32 = 6;
}

/// The tokenizer entries of a GGUF file's metadata.
#[derive(Debug, Clone, Default)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model` (`gpt2` is byte-level BPE).
    pub model: String,
    /// `tokenizer.ggml.pre`; absent or empty means llama.cpp's `default`.
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`: token text by id.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type`, one per token (all normal when absent).
    pub token_types: Option<Vec<i32>>,
    /// `tokenizer.ggml.merges`: `"A B"` in rank order.
    pub merges: Vec<String>,
}

/// The pre-tokenizer patterns llama.cpp uses for `pre` (`None`/empty: `default`).
pub fn pre_patterns(pre: Option<&str>) -> Result<Vec<String>> {
    let name = match pre {
        None | Some("") => "default",
        Some(p) => p,
    };
    let pats = llama_cpp_patterns(name).ok_or_else(|| {
        Error::format(format!(
            "GGUF tokenizer.ggml.pre = {name:?} is not a pre-tokenizer ferrolm knows; known: {}",
            LLAMA_CPP_PRE_NAMES.join(", ")
        ))
    })?;
    Ok(pats.into_iter().map(str::to_string).collect())
}

/// The tokenizer of a GGUF vocabulary: normal tokens are the BPE model, control, user-defined
/// and unknown tokens are special tokens, the merges keep their order. A single byte without a
/// token is dropped before merging, as in HF's BPE without an unknown token.
pub fn tokenizer_from_gguf(v: &GgufVocab) -> Result<Tokenizer> {
    if v.model != "gpt2" {
        return Err(Error::format(format!(
            "GGUF tokenizer.ggml.model = {:?} is not supported; ferrolm reads byte-level BPE \
             vocabularies (\"gpt2\")",
            v.model
        )));
    }
    let patterns = pre_patterns(v.pre.as_deref())?;
    let n = v.tokens.len();
    if n == 0 {
        return Err(Error::format("GGUF tokenizer.ggml.tokens is empty"));
    }
    if n > u32::MAX as usize {
        return Err(Error::format(format!("GGUF tokenizer.ggml.tokens has {n} entries")));
    }
    if let Some(types) = &v.token_types {
        if types.len() != n {
            return Err(Error::format(format!(
                "GGUF tokenizer.ggml.token_type has {} entries for {n} tokens; the arrays must \
                 have the same length",
                types.len()
            )));
        }
    }
    let mut tokens: Vec<Option<Box<[u8]>>> = vec![None; n];
    let mut specials = Vec::new();
    let mut ids: FxHashMap<&str, u32> = FxHashMap::default();
    for (id, text) in v.tokens.iter().enumerate() {
        let kind = v.token_types.as_ref().map_or(token_type::NORMAL, |t| t[id]);
        ids.insert(text.as_str(), id as u32);
        match kind {
            token_type::CONTROL | token_type::USER_DEFINED | token_type::UNKNOWN => {
                if text.is_empty() {
                    return Err(Error::format(format!(
                        "GGUF tokenizer.ggml.tokens[{id}] is an empty special token"
                    )));
                }
                specials.push((text.clone(), id as u32));
            }
            token_type::NORMAL | token_type::UNUSED | token_type::BYTE => {
                let bytes =
                    bytelevel_to_bytes(text).filter(|b| !b.is_empty()).ok_or_else(|| {
                        Error::format(format!(
                            "GGUF tokenizer.ggml.tokens[{id}] = {:?} is not byte-level BPE text",
                            text.chars().take(60).collect::<String>()
                        ))
                    })?;
                tokens[id] = Some(bytes.into_boxed_slice());
            }
            other => {
                return Err(Error::format(format!(
                    "GGUF tokenizer.ggml.token_type[{id}] = {other} is not a token type (1..=6)"
                )))
            }
        }
    }
    let mut merges = Vec::with_capacity(v.merges.len());
    for (i, m) in v.merges.iter().enumerate() {
        let pair = m.split_once(' ').filter(|(_, b)| !b.contains(' '));
        let lookup = |s: &str| ids.get(s).copied();
        let Some((a, b)) = pair.and_then(|(a, b)| Some((lookup(a)?, lookup(b)?))) else {
            return Err(Error::format(format!(
                "GGUF tokenizer.ggml.merges[{i}] = {:?} is not two vocabulary tokens 'A B'",
                m.chars().take(60).collect::<String>()
            )));
        };
        merges.push((a, b));
    }
    let mut bpe = Bpe::from_merges(tokens, merges).map_err(gguf_context)?;
    if patterns.len() == 1 && patterns[0] == super::pretokenize::LLAMA3_PATTERN {
        // llama.cpp sets ignore_merges for the Llama-3 family.
        bpe = bpe.with_ignore_merges();
    }
    Tokenizer::with_patterns(bpe, patterns, specials).map_err(gguf_context)
}

fn gguf_context(e: Error) -> Error {
    match e {
        Error::Value(m) | Error::Format(m) => Error::Format(format!("GGUF tokenizer: {m}")),
        e => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpe::formats::{byte_to_char, bytes_to_bytelevel};

    fn tiny(pre: &str) -> GgufVocab {
        let table = byte_to_char();
        let mut tokens = vec!["<|endoftext|>".to_string()];
        tokens.extend((0..=255u8).filter(|&b| b != 4).map(|b| bytes_to_bytelevel(&[b], &table)));
        tokens.push("Ġh".into());
        tokens.push("Ġhi".into());
        let mut types = vec![token_type::CONTROL];
        types.extend(std::iter::repeat_n(token_type::NORMAL, tokens.len() - 1));
        GgufVocab {
            model: "gpt2".into(),
            pre: Some(pre.into()),
            tokens,
            token_types: Some(types),
            merges: vec!["Ġ h".into(), "Ġh i".into()],
        }
    }

    #[test]
    fn reads_a_small_vocabulary() {
        let t = tokenizer_from_gguf(&tiny("smollm")).unwrap();
        assert_eq!(t.specials(), &[("<|endoftext|>".to_string(), 0)]);
        let hi = t.token_id(b" hi").unwrap();
        let ids = t.encode_ordinary(" hi 42\x04").unwrap();
        assert_eq!(ids.len(), 4, "{ids:?}"); // " hi", " ", "4", "2"; 0x04 is dropped
        assert_eq!(ids[0], hi);
        assert_eq!(t.decode_bytes(&ids).unwrap(), b" hi 42");
    }

    #[test]
    fn errors_name_the_field() {
        let mut v = tiny("no-such");
        let e = tokenizer_from_gguf(&v).unwrap_err().to_string();
        assert!(e.contains("\"no-such\"") && e.contains("smollm"), "{e}");
        v.pre = None;
        assert!(tokenizer_from_gguf(&v).is_ok()); // llama.cpp's default
        v.token_types.as_mut().unwrap().pop();
        let e = tokenizer_from_gguf(&v).unwrap_err().to_string();
        assert!(e.contains("token_type has"), "{e}");
        let mut v = tiny("gpt-2");
        v.merges.push("Ġhi nope".into());
        let e = tokenizer_from_gguf(&v).unwrap_err().to_string();
        assert!(e.contains("merges[2]"), "{e}");
        let mut v = tiny("gpt-2");
        v.model = "llama".into();
        assert!(matches!(tokenizer_from_gguf(&v), Err(Error::Format(_))));
    }
}
