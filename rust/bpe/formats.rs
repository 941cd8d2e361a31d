//! Reading and writing the files people already have: tiktoken rank files and HF tokenizers'
//! `tokenizer.json` (a BPE model behind a ByteLevel pre-tokenizer).
//!
//! Untrusted input: every field is checked before use and reported as `Error::Format` naming
//! the line or JSON path; nothing here panics on a malformed file.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Map, Value};

use super::model::Bpe;
use super::pretokenize::{
    Splitter, CL100K_PATTERN, CL100K_PATTERN_HF, DIGITS_PATTERN, GPT2_PATTERN,
    GPT2_PATTERN_LLAMACPP, GPT2_PATTERN_ORIGINAL,
};
use super::tokenizer::Tokenizer;
use crate::{Error, Result};

/// GPT-2's byte → printable char table (`bytes_to_unicode`), used by HF's ByteLevel.
pub fn byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).expect("latin-1 is valid")
        } else {
            n += 1;
            char::from_u32(255 + n).expect("below the surrogates")
        };
    }
    table
}

fn char_to_byte(c: char) -> Option<u8> {
    let cp = c as u32;
    match cp {
        33..=126 | 161..=172 | 174..=255 => Some(cp as u8),
        256..=323 => {
            // The non-printable bytes in increasing order, mapped to 256, 257, ...
            let k = cp - 256;
            (0u32..256)
                .filter(|b| {
                    !((33..=126).contains(b) || (161..=172).contains(b) || (174..=255).contains(b))
                })
                .nth(k as usize)
                .map(|b| b as u8)
        }
        _ => None,
    }
}

/// Token bytes as HF ByteLevel text ("Ġhello").
pub fn bytes_to_bytelevel(b: &[u8], table: &[char; 256]) -> String {
    b.iter().map(|&x| table[x as usize]).collect()
}

/// HF ByteLevel text back to bytes, or `None` if a char is outside the ByteLevel alphabet.
pub fn bytelevel_to_bytes(s: &str) -> Option<Vec<u8>> {
    s.chars().map(char_to_byte).collect()
}

/// Parses a tiktoken rank file: one `base64(token) rank` per line.
pub fn parse_tiktoken(data: &[u8]) -> Result<Vec<(Vec<u8>, u32)>> {
    let text = std::str::from_utf8(data)
        .map_err(|e| Error::format(format!("tiktoken file is not UTF-8 text: {e}")))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            continue;
        }
        let lineno = i + 1;
        let mut parts = line.split(' ');
        let (Some(tok), Some(rank), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(Error::format(format!(
                "tiktoken file line {lineno}: expected 'BASE64 RANK', got {:?}",
                truncate(line)
            )));
        };
        let bytes = B64.decode(tok).map_err(|e| {
            Error::format(format!(
                "tiktoken file line {lineno}: token {:?} is not base64: {e}",
                truncate(tok)
            ))
        })?;
        let rank: u32 = rank.parse().map_err(|_| {
            Error::format(format!(
                "tiktoken file line {lineno}: rank {:?} is not an integer in 0..2^32",
                truncate(rank)
            ))
        })?;
        if bytes.is_empty() {
            return Err(Error::format(format!("tiktoken file line {lineno}: empty token")));
        }
        out.push((bytes, rank));
    }
    if out.is_empty() {
        return Err(Error::format("tiktoken file has no ranks"));
    }
    let max = out.iter().map(|(_, r)| *r as u64).max().unwrap_or(0);
    if max >= (out.len() as u64) * 4 + 1024 {
        return Err(Error::format(format!(
            "tiktoken file: rank {max} is far beyond the {} ranks given; the file is corrupt",
            out.len()
        )));
    }
    Ok(out)
}

fn truncate(s: &str) -> String {
    s.chars().take(60).collect()
}

/// Writes the mergeable tokens of `tok` as a tiktoken rank file (rank = id).
pub fn dump_tiktoken(tok: &Tokenizer) -> String {
    let mut s = String::with_capacity(tok.bpe.len() * 16);
    for (id, t) in tok.bpe.tokens.iter().enumerate() {
        if let Some(t) = t {
            if tok.specials.iter().any(|(_, sid)| *sid as usize == id) {
                continue;
            }
            s.push_str(&B64.encode(t));
            s.push(' ');
            s.push_str(&id.to_string());
            s.push('\n');
        }
    }
    s
}

fn field<'a>(v: &'a Value, path: &str, key: &str) -> Result<&'a Value> {
    v.get(key).ok_or_else(|| Error::format(format!("tokenizer.json: {path} has no field {key:?}")))
}

fn null_or_empty(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.is_empty(),
        Some(Value::Bool(b)) => !*b,
        _ => false,
    }
}

/// HF's regex engine (Oniguruma, Ruby syntax) reads `X{n,m}+` as `(?:X{n,m})+`, where
/// fancy-regex reads a possessive `X{n,m}`. Patterns read from HF files are rewritten so ferrolm
/// cuts the pieces HF cuts; cl100k's HF spelling maps back to tiktoken's pattern.
pub(crate) fn onig_to_fancy(pat: &str) -> String {
    if pat == CL100K_PATTERN_HF {
        return CL100K_PATTERN.to_string();
    }
    pat.replace(r"\p{N}{1,3}+", r"(?:\p{N}{1,3})+")
}

fn is_gpt2(pattern: &str) -> bool {
    pattern == GPT2_PATTERN || pattern == GPT2_PATTERN_ORIGINAL || pattern == GPT2_PATTERN_LLAMACPP
}

/// The pre-tokenizer patterns of an HF `pre_tokenizer` object: one, or the stages of a chain
/// (a `Sequence` of `Split`/`Digits` stages ending in `ByteLevel`).
fn hf_patterns(pre: &Value) -> Result<Vec<String>> {
    let kind = pre.get("type").and_then(Value::as_str).unwrap_or("");
    let check_bytelevel = |bl: &Value| -> Result<bool> {
        for k in ["add_prefix_space", "use_regex", "trim_offsets"] {
            if !matches!(bl.get(k), None | Some(Value::Null) | Some(Value::Bool(_))) {
                return Err(Error::format(format!(
                    "tokenizer.json: ByteLevel pre-tokenizer field {k} is not a boolean"
                )));
            }
        }
        if bl.get("add_prefix_space").and_then(Value::as_bool).unwrap_or(false) {
            return Err(Error::format(
                "tokenizer.json: ByteLevel add_prefix_space=true is not supported; re-save the \
                 tokenizer with add_prefix_space=false",
            ));
        }
        Ok(bl.get("use_regex").and_then(Value::as_bool).unwrap_or(true))
    };
    let unsupported = || {
        Error::format(
            "tokenizer.json: unsupported pre_tokenizer Sequence; expected Split(Regex, Isolated) \
             and Digits stages followed by ByteLevel",
        )
    };
    match kind {
        "ByteLevel" => {
            if !check_bytelevel(pre)? {
                return Err(Error::format(
                    "tokenizer.json: a lone ByteLevel pre-tokenizer with use_regex=false is not \
                     supported (nothing would split the text)",
                ));
            }
            Ok(vec![GPT2_PATTERN.to_string()])
        }
        "Sequence" => {
            let items =
                field(pre, "pre_tokenizer", "pretokenizers")?.as_array().ok_or_else(|| {
                    Error::format("tokenizer.json: pre_tokenizer.pretokenizers is not a list")
                })?;
            let Some((bl, stages)) = items.split_last() else { return Err(unsupported()) };
            if bl.get("type").and_then(Value::as_str) != Some("ByteLevel") {
                return Err(unsupported());
            }
            let mut patterns = Vec::with_capacity(items.len());
            for stage in stages {
                match stage.get("type").and_then(Value::as_str) {
                    Some("Split") => {
                        let pat = stage
                            .get("pattern")
                            .and_then(|p| p.get("Regex"))
                            .and_then(Value::as_str)
                            .ok_or_else(|| {
                                Error::format(
                                    "tokenizer.json: Split pre-tokenizer needs a \
                                     {\"Regex\": ...} pattern",
                                )
                            })?;
                        let behavior = stage.get("behavior").and_then(Value::as_str).unwrap_or("");
                        let invert = stage.get("invert").and_then(Value::as_bool).unwrap_or(false);
                        if behavior != "Isolated" || invert {
                            return Err(Error::format(format!(
                                "tokenizer.json: Split behavior {behavior:?} (invert={invert}) is \
                                 not supported; expected \"Isolated\" with invert=false"
                            )));
                        }
                        patterns.push(onig_to_fancy(pat));
                    }
                    Some("Digits") => {
                        let single = stage
                            .get("individual_digits")
                            .and_then(Value::as_bool)
                            .unwrap_or(false);
                        let pat = if single { DIGITS_PATTERN } else { r"\p{N}+" };
                        patterns.push(pat.to_string());
                    }
                    _ => return Err(unsupported()),
                }
            }
            if check_bytelevel(bl)? {
                patterns.push(GPT2_PATTERN.to_string());
            }
            if patterns.is_empty() {
                return Err(unsupported());
            }
            Ok(patterns)
        }
        other => Err(Error::format(format!(
            "tokenizer.json: pre_tokenizer type {other:?} is not supported; ferrolm reads \
             byte-level BPE files (ByteLevel, or Split + ByteLevel)"
        ))),
    }
}

/// The HF `pre_tokenizer` object for `patterns` (the inverse of [`hf_patterns`]).
fn hf_pre_tokenizer(patterns: &[String]) -> Value {
    let bytelevel = |use_regex: bool| {
        json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
               "use_regex": use_regex})
    };
    if let [one] = patterns {
        if is_gpt2(one) {
            return bytelevel(true);
        }
    }
    let (stages, use_regex) = match patterns.split_last() {
        Some((last, rest)) if patterns.len() > 1 && is_gpt2(last) => (rest, true),
        _ => (patterns, false),
    };
    let mut items: Vec<Value> = stages
        .iter()
        .map(|p| {
            if patterns.len() > 1 && p == DIGITS_PATTERN {
                return json!({"type": "Digits", "individual_digits": true});
            }
            // HF's regex engine misreads cl100k's possessive `{1,3}+`: write the spelling both
            // engines read alike.
            let p = if p == CL100K_PATTERN { CL100K_PATTERN_HF } else { p.as_str() };
            json!({"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated",
                   "invert": false})
        })
        .collect();
    items.push(bytelevel(use_regex));
    json!({"type": "Sequence", "pretokenizers": items})
}

/// Whether `root` may take the byte-level fast path: nothing there that [`parse_fast`] would
/// ignore (added-token flags, non-special added tokens, a decoder other than ByteLevel).
fn fast_shape(root: &Value) -> bool {
    let flags_off = |a: &Value| {
        a.get("special").and_then(Value::as_bool).unwrap_or(true)
            && ["lstrip", "rstrip", "single_word", "normalized"]
                .iter()
                .all(|k| !a.get(k).and_then(Value::as_bool).unwrap_or(false))
    };
    let added_ok = match root.get("added_tokens") {
        Some(Value::Array(v)) => v.iter().all(flags_off),
        _ => true,
    };
    let decoder_ok = match root.get("decoder") {
        None | Some(Value::Null) => true,
        Some(d) => d.get("type").and_then(Value::as_str) == Some("ByteLevel"),
    };
    let unset = |k: &str| matches!(root.get(k), None | Some(Value::Null));
    added_ok && decoder_ok && unset("truncation") && unset("padding")
}

/// Reads an HF `tokenizer.json` holding a BPE model: the byte-level fast path when the file is
/// the plain GPT-2/cl100k shape, else HF's full pipeline ([`super::hf`]).
pub fn parse_hf_json(text: &str) -> Result<Tokenizer> {
    let root: Value = serde_json::from_str(text)
        .map_err(|e| Error::format(format!("tokenizer.json is not valid JSON: {e}")))?;
    let post = match root.get("post_processor") {
        None | Some(Value::Null) => (vec![], vec![]),
        Some(p) => super::hf::parse_post(p, "post_processor")?,
    };
    if fast_shape(&root) {
        if let Ok(t) = parse_fast(&root) {
            return Ok(t.with_post(post));
        }
    }
    Ok(pipeline_tokenizer(&root, text)?.with_post(post))
}

/// A tokenizer running HF's pipeline ([`super::hf`]) for the parsed `root` of `text`.
pub(crate) fn pipeline_tokenizer(root: &Value, text: &str) -> Result<Tokenizer> {
    let parsed = super::hf::parse(root, text)?;
    let t = Tokenizer::with_patterns(parsed.bpe, vec![GPT2_PATTERN.to_string()], parsed.specials)
        .map_err(|e| match e {
        Error::Value(m) => Error::Format(format!("tokenizer.json: {m}")),
        e => e,
    })?;
    Ok(t.with_pipeline(parsed.pipeline))
}

/// The byte-level fast path of [`parse_hf_json`].
fn parse_fast(root: &Value) -> Result<Tokenizer> {
    let model = field(root, "root", "model")?;
    let mtype = model.get("type").and_then(Value::as_str);
    if mtype.is_some() && mtype != Some("BPE") {
        return Err(Error::format(format!(
            "tokenizer.json: model type {:?} is not supported; expected \"BPE\"",
            mtype.unwrap_or("")
        )));
    }
    for key in ["continuing_subword_prefix", "end_of_word_suffix", "dropout"] {
        if !null_or_empty(model.get(key)) {
            return Err(Error::format(format!(
                "tokenizer.json: model.{key} is set; ferrolm does not support it"
            )));
        }
    }
    if model.get("byte_fallback").and_then(Value::as_bool).unwrap_or(false) {
        return Err(Error::format("tokenizer.json: model.byte_fallback=true is not supported"));
    }
    if !null_or_empty(root.get("normalizer")) {
        return Err(Error::format("tokenizer.json: a normalizer is set; ferrolm supports none"));
    }
    let patterns = match root.get("pre_tokenizer") {
        Some(p) if !p.is_null() => hf_patterns(p)?,
        _ => return Err(Error::format("tokenizer.json: no pre_tokenizer; expected ByteLevel")),
    };
    // A lone regex skips the text it does not match (tiktoken's rule); HF keeps that text as
    // pieces, so such a file takes the pipeline. The scanners cover all text either way.
    if let [one] = &patterns[..] {
        if matches!(Splitter::new(one)?, Splitter::Regex(_)) {
            return Err(Error::format("tokenizer.json: a lone Split regex takes HF's pipeline"));
        }
    }
    // Added tokens become special tokens.
    let mut specials: Vec<(String, u32)> = Vec::new();
    if let Some(added) = root.get("added_tokens") {
        let added = added
            .as_array()
            .ok_or_else(|| Error::format("tokenizer.json: added_tokens is not a list"))?;
        for (i, a) in added.iter().enumerate() {
            let content = a.get("content").and_then(Value::as_str);
            let id = a.get("id").and_then(Value::as_u64).filter(|&x| x <= u32::MAX as u64);
            let (Some(content), Some(id)) = (content, id) else {
                return Err(Error::format(format!(
                    "tokenizer.json: added_tokens[{i}] needs a string content and an id"
                )));
            };
            specials.push((content.to_string(), id as u32));
        }
    }
    let vocab = field(model, "model", "vocab")?
        .as_object()
        .ok_or_else(|| Error::format("tokenizer.json: model.vocab is not an object"))?;
    let mut tokens: Vec<Option<Box<[u8]>>> = Vec::new();
    for (s, id) in vocab {
        let id = id.as_u64().filter(|&x| x < (1 << 31)).ok_or_else(|| {
            Error::format(format!(
                "tokenizer.json: vocab id of {s:?} is not a non-negative integer"
            ))
        })? as usize;
        if id > vocab.len() * 4 + 1024 {
            return Err(Error::format(format!(
                "tokenizer.json: vocab id {id} of {s:?} is far beyond the vocabulary size"
            )));
        }
        if specials.iter().any(|(t, _)| t == s) {
            continue; // a special token listed in the vocab too (as GPT-2's files do)
        }
        let bytes = match bytelevel_to_bytes(s) {
            Some(b) if !b.is_empty() => b,
            _ => {
                return Err(Error::format(format!(
                    "tokenizer.json: vocab entry {s:?} is not ByteLevel-encoded text"
                )))
            }
        };
        if tokens.len() <= id {
            tokens.resize(id + 1, None);
        }
        if tokens[id].is_some() {
            return Err(Error::format(format!("tokenizer.json: vocab id {id} is used twice")));
        }
        tokens[id] = Some(bytes.into_boxed_slice());
    }
    let lookup = |s: &str, i: usize| -> Result<u32> {
        vocab.get(s).and_then(Value::as_u64).map(|x| x as u32).ok_or_else(|| {
            Error::format(format!(
                "tokenizer.json: merges[{i}] uses {s:?}, which is not in the vocab"
            ))
        })
    };
    let merges_v = field(model, "model", "merges")?
        .as_array()
        .ok_or_else(|| Error::format("tokenizer.json: model.merges is not a list"))?;
    let mut merges = Vec::with_capacity(merges_v.len());
    for (i, m) in merges_v.iter().enumerate() {
        let (a, b) = super::hf::merge_pair(m, i)?;
        merges.push((lookup(a, i)?, lookup(b, i)?));
    }
    let unk = match model.get("unk_token") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(
            specials
                .iter()
                .find(|(t, _)| t == s)
                .map(|(_, id)| *id)
                .or_else(|| vocab.get(s).and_then(Value::as_u64).map(|x| x as u32))
                .ok_or_else(|| {
                    Error::format(format!(
                        "tokenizer.json: model.unk_token {s:?} is neither in the vocab nor an \
                         added token"
                    ))
                })?,
        ),
        Some(_) => return Err(Error::format("tokenizer.json: model.unk_token is not a string")),
    };
    let fuse_unk = model.get("fuse_unk").and_then(Value::as_bool).unwrap_or(false);
    let mut bpe = Bpe::from_merges(tokens, merges)?.with_unknown(unk, fuse_unk);
    if model.get("ignore_merges").and_then(Value::as_bool).unwrap_or(false) {
        bpe = bpe.with_ignore_merges();
    }
    Tokenizer::with_patterns(bpe, patterns, specials).map_err(|e| match e {
        Error::Value(m) => Error::Format(format!("tokenizer.json: {m}")),
        e => e,
    })
}

/// Writes `tok` as an HF `tokenizer.json` (BPE model, ByteLevel pre-tokenizer and decoder).
pub fn dump_hf_json(tok: &Tokenizer) -> Result<String> {
    if let Some(p) = &tok.pipeline {
        return Ok(p.source.clone());
    }
    let table = byte_to_char();
    let mut vocab = Map::new();
    for (id, t) in tok.bpe.tokens.iter().enumerate() {
        if let Some(t) = t {
            vocab.insert(bytes_to_bytelevel(t, &table), json!(id));
        }
    }
    // Special tokens go in the model vocab too: HF otherwise renumbers added tokens that the
    // model does not know to the first free ids, which breaks vocabularies with gaps (cl100k).
    for (s, id) in &tok.specials {
        vocab.insert(s.clone(), json!(id));
    }
    let name = |id: u32| bytes_to_bytelevel(tok.bpe.token_bytes(id).unwrap_or_default(), &table);
    let merges: Vec<Value> = tok
        .bpe
        .merge_list()
        .iter()
        .map(|&(a, b)| Value::String(format!("{} {}", name(a), name(b))))
        .collect();
    let added: Vec<Value> = tok
        .specials
        .iter()
        .map(|(s, id)| {
            json!({"id": id, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    let pre = hf_pre_tokenizer(&tok.patterns);
    let unk = tok.bpe.unk.map(|id| match tok.specials.iter().find(|(_, i)| *i == id) {
        Some((s, _)) => s.clone(),
        None => name(id),
    });
    let root = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": false,
                           "trim_offsets": false, "use_regex": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                    "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": tok.bpe.fuse_unk, "byte_fallback": false,
            "ignore_merges": tok.bpe.ignore_merges,
            "vocab": vocab, "merges": merges,
        }
    });
    serde_json::to_string(&root)
        .map_err(|e| Error::format(format!("cannot serialise tokenizer.json: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytelevel_round_trips_every_byte() {
        let t = byte_to_char();
        for b in 0..=255u8 {
            assert_eq!(char_to_byte(t[b as usize]), Some(b));
        }
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(bytelevel_to_bytes("Ġhello").unwrap(), b" hello");
    }

    #[test]
    fn tiktoken_errors_name_the_line() {
        assert!(parse_tiktoken(b"").unwrap_err().to_string().contains("no ranks"));
        let e = parse_tiktoken(b"YQ== 0\n!!! 1\n").unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
        let e = parse_tiktoken(b"YQ== x\n").unwrap_err().to_string();
        assert!(e.contains("not an integer"), "{e}");
    }

    #[test]
    fn hf_json_errors_are_format_errors() {
        assert!(matches!(parse_hf_json("{"), Err(Error::Format(_))));
        assert!(matches!(parse_hf_json("{}"), Err(Error::Format(_))));
        let bad = r#"{"model": {"type": "WordPiece", "vocab": {}}, "pre_tokenizer": null}"#;
        assert!(parse_hf_json(bad).unwrap_err().to_string().contains("WordPiece"));
    }
}
