//! A complete tokenizer: pre-tokenizer, BPE model and special tokens.

use aho_corasick::{AhoCorasick, MatchKind};
use rayon::prelude::*;

use super::hf::Pipeline;
use super::model::{with_scratch, Bpe, Scratch};
use super::pretokenize::Splitter;
use crate::{Error, Result};

/// What `encode` does with each special token found in the text (tiktoken's semantics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecialPolicy {
    /// Encoded as the special token's id.
    Allowed,
    /// Raises `Error::DisallowedSpecial`.
    Disallowed,
    /// Encoded as ordinary text.
    Text,
}

/// Byte-level BPE tokenizer: a [`Splitter`], a [`Bpe`] model and special tokens.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    pub(crate) bpe: Bpe,
    pub(crate) splitter: Splitter,
    /// One pattern, or the stages of a llama.cpp-style chain.
    pub(crate) patterns: Vec<String>,
    /// (text, id), in the order given.
    pub(crate) specials: Vec<(String, u32)>,
    matcher: Option<AhoCorasick>,
    /// HF's full pipeline, for `tokenizer.json` files beyond the byte-level fast path.
    pub(crate) pipeline: Option<Box<Pipeline>>,
    /// Ids the post-processor puts before and after a text (`add_special_tokens=True`).
    pub(crate) post: (Vec<u32>, Vec<u32>),
}

impl Tokenizer {
    /// Assembles a tokenizer; special ids must not collide with mergeable ids.
    pub fn new(bpe: Bpe, pattern: &str, specials: Vec<(String, u32)>) -> Result<Self> {
        Self::with_patterns(bpe, vec![pattern.to_string()], specials)
    }

    /// As [`Tokenizer::new`], with a chain of patterns (see [`Splitter::from_patterns`]).
    pub fn with_patterns(
        bpe: Bpe,
        patterns: Vec<String>,
        specials: Vec<(String, u32)>,
    ) -> Result<Self> {
        let splitter = Splitter::from_patterns(&patterns)?;
        for (i, (s, id)) in specials.iter().enumerate() {
            if s.is_empty() {
                return Err(Error::value("a special token cannot be the empty string"));
            }
            if specials[..i].iter().any(|(t, _)| t == s) {
                return Err(Error::value(format!("special token {s:?} is given twice")));
            }
            if let Some((t, _)) = specials[..i].iter().find(|(_, j)| j == id) {
                return Err(Error::value(format!(
                    "special tokens {t:?} and {s:?} both have id {id}"
                )));
            }
            if let Some(b) = bpe.token_bytes(*id) {
                // HF files list some special tokens in the model vocabulary too (GPT-2's
                // <|endoftext|>); that is fine when the bytes agree.
                if b != s.as_bytes() {
                    return Err(Error::value(format!(
                        "special token {s:?} has id {id}, which is already the ordinary token {:?}",
                        String::from_utf8_lossy(b)
                    )));
                }
            }
        }
        let matcher = if specials.is_empty() {
            None
        } else {
            Some(
                AhoCorasick::builder()
                    .match_kind(MatchKind::LeftmostLongest)
                    .build(specials.iter().map(|(s, _)| s.as_str()))
                    .map_err(|e| Error::value(format!("cannot index the special tokens: {e}")))?,
            )
        };
        Ok(Tokenizer {
            bpe,
            splitter,
            patterns,
            specials,
            matcher,
            pipeline: None,
            post: (Vec::new(), Vec::new()),
        })
    }

    /// This tokenizer with HF's pipeline in place of the byte-level pre-tokenizer.
    pub fn with_pipeline(mut self, p: Pipeline) -> Self {
        self.pipeline = Some(Box::new(p));
        self
    }

    /// This tokenizer with post-processor ids (before, after) for `add_special_tokens`.
    pub fn with_post(mut self, post: (Vec<u32>, Vec<u32>)) -> Self {
        self.post = post;
        self
    }

    /// HF's pipeline, when the tokenizer came from a `tokenizer.json` that needs one.
    pub fn pipeline(&self) -> Option<&Pipeline> {
        self.pipeline.as_deref()
    }

    /// The ids the post-processor puts before and after a text.
    pub fn post(&self) -> (&[u32], &[u32]) {
        (&self.post.0, &self.post.1)
    }

    /// The pre-tokenized pieces of `text` as the model sees them.
    pub fn pieces(&self, text: &str) -> Result<Vec<String>> {
        match &self.pipeline {
            Some(p) => p.pieces(text),
            None => Ok(self.splitter.pieces(text)?.into_iter().map(str::to_string).collect()),
        }
    }

    /// The text of `ids`: HF's decoders for a pipeline tokenizer, else the bytes decoded as
    /// UTF-8 with U+FFFD for invalid sequences.
    pub fn decode_text(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        if let Some(p) = &self.pipeline {
            return p.decode(ids, skip_special);
        }
        let ids: Vec<u64> = ids
            .iter()
            .filter(|i| !skip_special || !self.specials.iter().any(|(_, s)| s == *i))
            .map(|&i| i as u64)
            .collect();
        let mut out = Vec::new();
        self.decode_into(ids, &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// The BPE model.
    pub fn bpe(&self) -> &Bpe {
        &self.bpe
    }

    /// The pre-tokenizer pattern (the last stage of a chain).
    pub fn pattern(&self) -> &str {
        self.patterns.last().map_or("", String::as_str)
    }

    /// The pre-tokenizer patterns: one, or the stages of a chain in order.
    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }

    /// The pre-tokenizer.
    pub fn splitter(&self) -> &Splitter {
        &self.splitter
    }

    /// Special tokens as (text, id).
    pub fn specials(&self) -> &[(String, u32)] {
        &self.specials
    }

    /// One past the largest id (mergeable or special).
    pub fn n_vocab(&self) -> usize {
        let s = self.specials.iter().map(|(_, id)| *id as usize + 1).max().unwrap_or(0);
        // Non-special added tokens of a pipeline may lie beyond the model's ids.
        let p = self.pipeline.as_ref().map_or(0, |p| p.token_strings().len());
        s.max(self.bpe.id_bound()).max(p)
    }

    /// Number of distinct tokens (mergeable plus special ones not also in the model).
    pub fn vocab_size(&self) -> usize {
        self.bpe.len()
            + self.specials.iter().filter(|(_, id)| self.bpe.token_bytes(*id).is_none()).count()
    }

    /// Encodes text with no special-token handling, appending to `out`.
    pub fn encode_ordinary_into(
        &self,
        text: &str,
        scratch: &mut Scratch,
        out: &mut Vec<u32>,
    ) -> Result<()> {
        if let Some(p) = &self.pipeline {
            return p.encode(&self.bpe, text, &[], scratch, out);
        }
        self.splitter.split(text, |piece| self.bpe.encode_piece(piece.as_bytes(), scratch, out))
    }

    /// Encodes text, ignoring special tokens (they are ordinary text).
    pub fn encode_ordinary(&self, text: &str) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        with_scratch(|s| self.encode_ordinary_into(text, s, &mut out))?;
        Ok(out)
    }

    /// Encodes text; `policy[i]` says what to do with `specials()[i]` where it appears.
    pub fn encode_into(
        &self,
        text: &str,
        policy: &[SpecialPolicy],
        scratch: &mut Scratch,
        out: &mut Vec<u32>,
    ) -> Result<()> {
        if let Some(p) = &self.pipeline {
            if policy.len() != self.specials.len() {
                return Err(Error::value(format!(
                    "special-token policy has {} entries for {} special tokens",
                    policy.len(),
                    self.specials.len()
                )));
            }
            return p.encode(&self.bpe, text, policy, scratch, out);
        }
        let matcher = match &self.matcher {
            Some(m) if policy.iter().any(|p| *p != SpecialPolicy::Text) => m,
            _ => return self.encode_ordinary_into(text, scratch, out),
        };
        if policy.len() != self.specials.len() {
            return Err(Error::value(format!(
                "special-token policy has {} entries for {} special tokens",
                policy.len(),
                self.specials.len()
            )));
        }
        // Disallowed tokens are checked over the whole text first, as tiktoken does.
        let mut cuts = Vec::new();
        for m in matcher.find_iter(text) {
            let k = m.pattern().as_usize();
            match policy[k] {
                SpecialPolicy::Disallowed => {
                    return Err(Error::DisallowedSpecial(self.specials[k].0.clone()))
                }
                SpecialPolicy::Allowed => cuts.push((m.start(), m.end(), self.specials[k].1)),
                SpecialPolicy::Text => {}
            }
        }
        let mut start = 0;
        for (s, e, id) in cuts {
            self.encode_ordinary_into(&text[start..s], scratch, out)?;
            out.push(id);
            start = e;
        }
        self.encode_ordinary_into(&text[start..], scratch, out)
    }

    /// Encodes text with the given special-token policy.
    pub fn encode(&self, text: &str, policy: &[SpecialPolicy]) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        with_scratch(|s| self.encode_into(text, policy, s, &mut out))?;
        Ok(out)
    }

    /// Encodes many texts on the current rayon pool (see [`crate::parallel::install`]).
    pub fn encode_batch<S: AsRef<str> + Sync>(
        &self,
        texts: &[S],
        policy: &[SpecialPolicy],
    ) -> Result<Vec<Vec<u32>>> {
        // Small chunks keep both threads busy when lengths vary; scratch buffers are per chunk.
        texts
            .par_chunks(16)
            .map(|chunk| {
                with_scratch(|scratch| {
                    chunk
                        .iter()
                        .map(|t| {
                            let t = t.as_ref();
                            let mut out = Vec::with_capacity(t.len() / 3 + 1);
                            self.encode_into(t, policy, scratch, &mut out)?;
                            Ok(out)
                        })
                        .collect::<Result<Vec<_>>>()
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(|v| v.into_iter().flatten().collect())
    }

    /// The bytes of one token (mergeable or special).
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.bpe
            .token_bytes(id)
            .or_else(|| self.specials.iter().find(|(_, i)| *i == id).map(|(s, _)| s.as_bytes()))
            .or_else(|| {
                let p = self.pipeline.as_ref()?;
                p.token_strings().get(id as usize)?.as_deref().map(str::as_bytes)
            })
    }

    fn unknown(&self, id: u64) -> Error {
        Error::UnknownId { id: id as i128, valid: format!("0..{} less gaps", self.n_vocab()) }
    }

    /// Appends the bytes of `ids` to `out`.
    pub fn decode_into(&self, ids: impl IntoIterator<Item = u64>, out: &mut Vec<u8>) -> Result<()> {
        if let Some(p) = &self.pipeline {
            let ids = ids
                .into_iter()
                .map(|id| u32::try_from(id).map_err(|_| self.unknown(id)))
                .collect::<Result<Vec<u32>>>()?;
            out.extend_from_slice(p.decode(&ids, false)?.as_bytes());
            return Ok(());
        }
        for id in ids {
            let b = u32::try_from(id)
                .ok()
                .and_then(|i| self.bpe.token_bytes(i).or_else(|| self.special_bytes(i)))
                .ok_or_else(|| self.unknown(id))?;
            out.extend_from_slice(b);
        }
        Ok(())
    }

    #[inline]
    fn special_bytes(&self, id: u32) -> Option<&[u8]> {
        self.specials.iter().find(|(_, i)| *i == id).map(|(s, _)| s.as_bytes())
    }

    /// The bytes of `ids` concatenated.
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        self.decode_into(ids.iter().map(|&i| i as u64), &mut out)?;
        Ok(out)
    }

    /// The id of the token with these bytes (special tokens by their text).
    pub fn token_id(&self, b: &[u8]) -> Option<u32> {
        self.specials
            .iter()
            .find(|(s, _)| s.as_bytes() == b)
            .map(|(_, id)| *id)
            .or_else(|| self.bpe.token_id(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpe::{Bpe, GPT2_PATTERN};

    fn tiny() -> Tokenizer {
        let mut r: Vec<(Vec<u8>, u32)> = (0..=255u8).map(|b| (vec![b], b as u32)).collect();
        r.push((b" h".to_vec(), 256));
        r.push((b" hi".to_vec(), 257));
        let bpe = Bpe::from_ranks(r).unwrap();
        Tokenizer::new(bpe, GPT2_PATTERN, vec![("<|eot|>".into(), 300)]).unwrap()
    }

    #[test]
    fn specials_follow_policy() {
        let t = tiny();
        let text = "a hi<|eot|> hi";
        let allowed = t.encode(text, &[SpecialPolicy::Allowed]).unwrap();
        assert_eq!(allowed, vec![97, 257, 300, 257]);
        assert!(matches!(
            t.encode(text, &[SpecialPolicy::Disallowed]),
            Err(Error::DisallowedSpecial(_))
        ));
        let plain = t.encode(text, &[SpecialPolicy::Text]).unwrap();
        assert_eq!(plain, t.encode_ordinary(text).unwrap());
        assert_eq!(t.decode_bytes(&allowed).unwrap(), text.as_bytes());
    }

    #[test]
    fn unknown_id_is_an_error() {
        let t = tiny();
        assert!(matches!(t.decode_bytes(&[299]), Err(Error::UnknownId { id: 299, .. })));
    }
}
