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
    /// `tokenizer.ggml.scores` (SentencePiece vocabularies, `model = "llama"`).
    pub scores: Option<Vec<f32>>,
    /// `tokenizer.ggml.add_space_prefix` (`llama`; default true).
    pub add_space_prefix: Option<bool>,
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
    if v.model == "llama" {
        return llama_from_gguf(v);
    }
    if v.model != "gpt2" {
        return Err(Error::format(format!(
            "GGUF tokenizer.ggml.model = {:?} is not supported; ferrolm reads byte-level BPE \
             (\"gpt2\") and SentencePiece BPE (\"llama\") vocabularies",
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

/// The merges a SentencePiece BPE vocabulary implies, as transformers' converter writes them for
/// HF: every split of every token into two tokens, ordered by the token's score (stable; within
/// one token by the ids of the two halves); and each merge's rank as llama.cpp merges (the
/// adjacent pair whose concatenation is the token of highest score, ties to the leftmost pair):
/// merges of equal score share a rank.
fn spm_merges(
    tokens: &[String],
    scores: &[f32],
    ids: &FxHashMap<&str, u32>,
) -> (Vec<(u32, u32)>, Vec<u32>) {
    let mut merges: Vec<(u32, u32, f32)> = Vec::new();
    let mut local = Vec::new();
    for (t, &score) in tokens.iter().zip(scores) {
        local.clear();
        for (k, _) in t.char_indices().skip(1) {
            if let (Some(&l), Some(&r)) = (ids.get(&t[..k]), ids.get(&t[k..])) {
                local.push((l, r, score));
            }
        }
        local.sort_by_key(|&(l, r, _)| (l, r));
        merges.extend_from_slice(&local);
    }
    merges.sort_by(|a, b| b.2.total_cmp(&a.2));
    let mut ranks = Vec::with_capacity(merges.len());
    let mut rank = 0u32;
    for (i, m) in merges.iter().enumerate() {
        if i > 0 && merges[i - 1].2.total_cmp(&m.2).is_ne() {
            rank += 1;
        }
        ranks.push(rank);
    }
    (merges.into_iter().map(|(l, r, _)| (l, r)).collect(), ranks)
}

/// A `model = "llama"` vocabulary (SentencePiece BPE with scores and byte fallback) as the HF
/// pipeline llama.cpp's tokenizer equals: `▁` for spaces and before each text segment
/// (`add_space_prefix`), merges by score, `<0xXX>` tokens for chars without a token.
fn llama_from_gguf(v: &GgufVocab) -> Result<Tokenizer> {
    use serde_json::{json, Map, Value};
    let n = v.tokens.len();
    if n == 0 {
        return Err(Error::format("GGUF tokenizer.ggml.tokens is empty"));
    }
    let types = v.token_types.clone().unwrap_or_else(|| vec![token_type::NORMAL; n]);
    let scores = v.scores.clone().unwrap_or_else(|| vec![0.0; n]);
    for (name, len) in [("token_type", types.len()), ("scores", scores.len())] {
        if len != n {
            return Err(Error::format(format!(
                "GGUF tokenizer.ggml.{name} has {len} entries for {n} tokens; the arrays must \
                 have the same length"
            )));
        }
    }
    let mut ids: FxHashMap<&str, u32> = FxHashMap::default();
    let mut vocab = Map::new();
    let mut added = Vec::new();
    let mut unk: Option<&str> = None;
    for (id, text) in v.tokens.iter().enumerate() {
        if text.is_empty() || ids.contains_key(text.as_str()) {
            continue; // llama.cpp keeps the first of duplicate texts; empty ones never match
        }
        ids.insert(text, id as u32);
        vocab.insert(text.clone(), json!(id));
        let special = match types[id] {
            token_type::CONTROL => Some(true),
            token_type::UNKNOWN => {
                unk = Some(text);
                Some(true)
            }
            token_type::USER_DEFINED => Some(false),
            token_type::NORMAL | token_type::UNUSED | token_type::BYTE => None,
            other => {
                return Err(Error::format(format!(
                    "GGUF tokenizer.ggml.token_type[{id}] = {other} is not a token type (1..=6)"
                )))
            }
        };
        if let Some(special) = special {
            added.push(json!({"id": id, "content": text, "single_word": false, "lstrip": false,
                              "rstrip": false, "normalized": false, "special": special}));
        }
    }
    let names: Vec<&str> = {
        let mut names = vec![""; n];
        for (t, &i) in &ids {
            names[i as usize] = t;
        }
        names
    };
    let (merges, ranks) = spm_merges(&v.tokens, &scores, &ids);
    let merges: Vec<Value> =
        merges.into_iter().map(|(l, r)| json!([names[l as usize], names[r as usize]])).collect();
    let space = v.add_space_prefix.unwrap_or(true);
    let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
    let normalizer = if space {
        json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u{2581}"}, replace]})
    } else {
        replace
    };
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if space {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let root = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                  "ignore_merges": false, "vocab": vocab, "merges": merges},
    });
    let text = serde_json::to_string(&root)
        .map_err(|e| Error::format(format!("GGUF tokenizer: cannot build tokenizer.json: {e}")))?;
    let mut t = super::formats::pipeline_tokenizer(&root, &text).map_err(gguf_context)?;
    // HF's merge list orders tokens of equal score by id; llama.cpp merges them leftmost first.
    t.bpe = t.bpe.with_merge_ranks(&ranks)?;
    Ok(t)
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
            scores: None,
            add_space_prefix: None,
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
        v.model = "bert".into();
        assert!(matches!(tokenizer_from_gguf(&v), Err(Error::Format(_))));
    }
}
