//! HF tokenizers' pipeline for `tokenizer.json` files that are not the plain byte-level shape:
//! normalizers, pre-tokenizers, a char-level BPE model (byte fallback, unk, subword prefix and
//! suffix), added tokens with their flags, post-processors and decoders, each with HF's
//! semantics (`tokenizers/src/{normalizers,pre_tokenizers,decoders,processors}`).
//!
//! Performance note: a file whose pipeline is the plain GPT-2/cl100k shape never comes here
//! (`formats::parse_hf_json` keeps it on the byte-level fast path). When the pre-tokenizer ends
//! in ByteLevel over a byte-level vocabulary, pieces go to the byte-level BPE with its
//! whole-piece table and cache, so NFKC + ByteLevel costs only the normalizer and the copies;
//! other models run HF's char-level merge per word.

use aho_corasick::{AhoCorasick, MatchKind};
use fancy_regex::Regex;
use serde_json::Value;
use unicode_normalization::UnicodeNormalization;

use super::formats::{byte_to_char, bytelevel_to_bytes};
use super::model::{Bpe, Scratch, WordOpts};
use super::pretokenize::Splitter;
use super::tokenizer::SpecialPolicy;
use crate::{Error, Result};

/// A string or regex pattern (HF `Pattern`: `{"String": ..}` or `{"Regex": ..}`).
#[derive(Debug, Clone)]
pub enum Pat {
    /// A literal; an empty literal matches nothing.
    Str(String),
    /// A regex (fancy-regex syntax; HF uses Oniguruma).
    Re(Box<Regex>),
}

impl Pat {
    /// (start, end) of each non-overlapping match, leftmost first.
    fn find(&self, s: &str) -> Result<Vec<(usize, usize)>> {
        match self {
            Pat::Str(p) if p.is_empty() => Ok(Vec::new()),
            Pat::Str(p) => Ok(s.match_indices(p.as_str()).map(|(i, m)| (i, i + m.len())).collect()),
            Pat::Re(re) => re
                .find_iter(s)
                .map(|m| {
                    m.map(|m| (m.start(), m.end())).map_err(|e| {
                        Error::value(format!("a tokenizer.json regex failed on the input: {e}"))
                    })
                })
                .collect(),
        }
    }

    fn replace(&self, s: &str, content: &str) -> Result<String> {
        let mut out = String::with_capacity(s.len());
        let mut last = 0;
        for (a, b) in self.find(s)? {
            out.push_str(&s[last..a]);
            out.push_str(content);
            last = b;
        }
        out.push_str(&s[last..]);
        Ok(out)
    }
}

/// HF normalizers.
#[derive(Debug, Clone)]
pub enum Normalizer {
    Nfc,
    Nfd,
    Nfkc,
    Nfkd,
    Lowercase,
    Strip { left: bool, right: bool },
    Replace { pat: Pat, content: String },
    Prepend(String),
    Sequence(Vec<Normalizer>),
    Bert { clean_text: bool, chinese: bool, strip_accents: bool, lowercase: bool },
}

/// Whether `c` is in a Unicode general category: `which` 0 = P*, 1 = C*, 2 = Mn.
fn in_category(c: char, which: usize) -> bool {
    if c.is_ascii() {
        return match which {
            0 => c.is_ascii_punctuation() && !"$+<=>^`|~".contains(c),
            1 => c.is_ascii_control(),
            _ => false,
        };
    }
    use std::sync::OnceLock;
    static RES: OnceLock<[Regex; 3]> = OnceLock::new();
    let res = RES.get_or_init(|| {
        [r"^\p{P}$", r"^\p{C}$", r"^\p{Mn}$"].map(|p| Regex::new(p).expect("a valid regex"))
    });
    let mut b = [0u8; 4];
    res[which].is_match(c.encode_utf8(&mut b)).unwrap_or(false)
}

/// BERT's CJK ideograph ranges (HF `normalizers::bert::is_chinese_char`).
fn is_chinese_char(c: char) -> bool {
    matches!(c as u32, 0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2A6DF | 0x2A700..=0x2B73F
        | 0x2B740..=0x2B81F | 0x2B920..=0x2CEAF | 0xF900..=0xFAFF | 0x2F800..=0x2FA1F)
}

fn bert_normalize(s: &str, clean: bool, chinese: bool, strip: bool, lower: bool) -> String {
    let mut t = String::with_capacity(s.len());
    for c in s.chars() {
        if clean {
            let control = !matches!(c, '\t' | '\n' | '\r') && in_category(c, 1);
            if c == '\0' || c == '\u{fffd}' || control {
                continue;
            }
            if matches!(c, '\t' | '\n' | '\r') || c.is_whitespace() {
                t.push(' ');
                continue;
            }
        }
        if chinese && is_chinese_char(c) {
            t.push(' ');
            t.push(c);
            t.push(' ');
        } else {
            t.push(c);
        }
    }
    if strip {
        t = t.nfd().filter(|&c| !in_category(c, 2)).collect();
    }
    if lower {
        t = t.chars().flat_map(char::to_lowercase).collect();
    }
    t
}

impl Normalizer {
    /// The normalized text.
    pub fn normalize(&self, s: &str) -> Result<String> {
        Ok(match self {
            Normalizer::Nfc => s.nfc().collect(),
            Normalizer::Nfd => s.nfd().collect(),
            Normalizer::Nfkc => s.nfkc().collect(),
            Normalizer::Nfkd => s.nfkd().collect(),
            // Char by char, as HF does (no final-sigma rule).
            Normalizer::Lowercase => s.chars().flat_map(char::to_lowercase).collect(),
            Normalizer::Strip { left, right } => {
                let mut t = s;
                if *left {
                    t = t.trim_start();
                }
                if *right {
                    t = t.trim_end();
                }
                t.to_string()
            }
            Normalizer::Replace { pat, content } => pat.replace(s, content)?,
            Normalizer::Prepend(p) if !s.is_empty() => format!("{p}{s}"),
            Normalizer::Prepend(_) => String::new(),
            Normalizer::Bert { clean_text, chinese, strip_accents, lowercase } => {
                bert_normalize(s, *clean_text, *chinese, *strip_accents, *lowercase)
            }
            Normalizer::Sequence(items) => {
                let mut t = s.to_string();
                for n in items {
                    t = n.normalize(&t)?;
                }
                t
            }
        })
    }
}

/// HF `SplitDelimiterBehavior`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behavior {
    Removed,
    Isolated,
    MergedWithPrevious,
    MergedWithNext,
    Contiguous,
}

/// HF Metaspace's `prepend_scheme`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prepend {
    First,
    Always,
    Never,
}

/// One pre-tokenizer stage (HF `Sequence`s are flattened).
#[derive(Debug, Clone)]
pub enum Pre {
    /// `map`: whether pieces are rewritten in GPT-2's byte alphabet (false when the byte-level
    /// model reads the raw bytes instead).
    ByteLevel {
        add_prefix_space: bool,
        use_regex: bool,
        map: bool,
    },
    Split {
        pat: Pat,
        behavior: Behavior,
        invert: bool,
    },
    Digits {
        individual: bool,
    },
    Metaspace {
        replacement: char,
        prepend: Prepend,
        split: bool,
    },
    Whitespace,
    WhitespaceSplit,
    Punctuation(Behavior),
    Bert,
}

/// HF's `is_punctuation`: ASCII punctuation or Unicode category P*.
fn is_punc(c: char) -> bool {
    c.is_ascii_punctuation() || (!c.is_ascii() && in_category(c, 0))
}

/// HF's `Pattern::find_matches` for a char predicate: each matching char is its own match.
fn char_matches(s: &str, f: impl Fn(char) -> bool) -> Vec<(usize, usize, bool)> {
    let mut v = Vec::new();
    let mut last = 0;
    for (i, c) in s.char_indices() {
        if f(c) {
            if last < i {
                v.push((last, i, false));
            }
            v.push((i, i + c.len_utf8(), true));
            last = i + c.len_utf8();
        }
    }
    if last < s.len() {
        v.push((last, s.len(), false));
    }
    v
}

/// HF's `Pattern::find_matches` for a regex or string: matches and the text between them.
fn pat_matches(s: &str, pat: &Pat) -> Result<Vec<(usize, usize, bool)>> {
    let mut v = Vec::new();
    let mut last = 0;
    for (a, b) in pat.find(s)? {
        if last != a {
            v.push((last, a, false));
        }
        v.push((a, b, true));
        last = b;
    }
    if last != s.len() {
        v.push((last, s.len(), false));
    }
    Ok(v)
}

/// HF's `NormalizedString::split`: the pieces (start, end) that `behavior` keeps, empty ones
/// dropped.
fn apply_behavior(
    mut m: Vec<(usize, usize, bool)>,
    behavior: Behavior,
    invert: bool,
) -> Vec<(usize, usize)> {
    if invert {
        for x in &mut m {
            x.2 = !x.2;
        }
    }
    let mut out: Vec<(usize, usize)> = Vec::with_capacity(m.len());
    match behavior {
        Behavior::Isolated => out.extend(m.iter().map(|&(a, b, _)| (a, b))),
        Behavior::Removed => out.extend(m.iter().filter(|x| !x.2).map(|&(a, b, _)| (a, b))),
        Behavior::MergedWithPrevious => {
            let mut prev_match = false;
            for (a, b, is) in m {
                match out.last_mut() {
                    Some(last) if is && !prev_match => last.1 = b,
                    _ => out.push((a, b)),
                }
                prev_match = is;
            }
        }
        Behavior::MergedWithNext => {
            let mut prev_match = false;
            for (a, b, is) in m.into_iter().rev() {
                match out.last_mut() {
                    Some(last) if is && !prev_match => last.0 = a,
                    _ => out.push((a, b)),
                }
                prev_match = is;
            }
            out.reverse();
        }
        Behavior::Contiguous => {
            let mut prev_match = false;
            for (a, b, is) in m {
                match out.last_mut() {
                    Some(last) if is == prev_match => last.1 = b,
                    _ => out.push((a, b)),
                }
                prev_match = is;
            }
        }
    }
    out.retain(|&(a, b)| a < b);
    out
}

/// A piece during pre-tokenization: its text and whether it starts the input (Metaspace
/// `prepend_scheme = first` looks at that).
type Piece = (String, bool);

impl Pre {
    fn run(&self, pieces: Vec<Piece>, table: &[char; 256]) -> Result<Vec<Piece>> {
        let mut out = Vec::with_capacity(pieces.len() * 2);
        for (s, start) in pieces {
            let s = match self {
                Pre::ByteLevel { add_prefix_space: true, .. } if !s.starts_with(' ') => {
                    format!(" {s}")
                }
                Pre::Metaspace { replacement, prepend, .. } => {
                    let mut r = [0u8; 4];
                    let rep: &str = replacement.encode_utf8(&mut r);
                    let t = s.replace(' ', rep);
                    let add = match prepend {
                        Prepend::Always => !t.starts_with(*replacement),
                        Prepend::First => !t.starts_with(*replacement) && start,
                        Prepend::Never => false,
                    };
                    if add {
                        format!("{rep}{t}")
                    } else {
                        t
                    }
                }
                _ => s,
            };
            let spans: Vec<(usize, usize)> = match self {
                Pre::ByteLevel { use_regex: true, .. } => {
                    let mut v = Vec::new();
                    let base = s.as_ptr() as usize;
                    Splitter::Gpt2.split(&s, |p| {
                        let a = p.as_ptr() as usize - base;
                        v.push((a, a + p.len()));
                    })?;
                    v
                }
                Pre::ByteLevel { .. } => vec![(0, s.len())],
                Pre::Split { pat, behavior, invert } => {
                    apply_behavior(pat_matches(&s, pat)?, *behavior, *invert)
                }
                Pre::Digits { individual } => {
                    let b = if *individual { Behavior::Isolated } else { Behavior::Contiguous };
                    apply_behavior(char_matches(&s, char::is_numeric), b, false)
                }
                Pre::Metaspace { replacement, split, .. } => {
                    if *split {
                        let r = *replacement;
                        apply_behavior(
                            char_matches(&s, |c| c == r),
                            Behavior::MergedWithNext,
                            false,
                        )
                    } else {
                        vec![(0, s.len())]
                    }
                }
                Pre::Whitespace => {
                    use std::sync::OnceLock;
                    static RE: OnceLock<Pat> = OnceLock::new();
                    let pat = RE.get_or_init(|| {
                        Pat::Re(Box::new(Regex::new(r"\w+|[^\w\s]+").expect("a valid regex")))
                    });
                    apply_behavior(pat_matches(&s, pat)?, Behavior::Removed, true)
                }
                Pre::WhitespaceSplit => {
                    apply_behavior(char_matches(&s, char::is_whitespace), Behavior::Removed, false)
                }
                Pre::Punctuation(b) => apply_behavior(char_matches(&s, is_punc), *b, false),
                Pre::Bert => {
                    let words = apply_behavior(
                        char_matches(&s, char::is_whitespace),
                        Behavior::Removed,
                        false,
                    );
                    let mut v = Vec::new();
                    for (a, b) in words {
                        for (x, y) in apply_behavior(
                            char_matches(&s[a..b], is_punc),
                            Behavior::Isolated,
                            false,
                        ) {
                            v.push((a + x, a + y));
                        }
                    }
                    v
                }
            };
            let map = matches!(self, Pre::ByteLevel { map: true, .. });
            for (a, b) in spans {
                if a >= b {
                    continue;
                }
                let p = &s[a..b];
                let p = if map {
                    p.bytes().map(|x| table[x as usize]).collect()
                } else {
                    p.to_string()
                };
                out.push((p, start && a == 0));
            }
        }
        Ok(out)
    }
}

/// HF decoders, over the token strings.
#[derive(Debug, Clone)]
pub enum Decoder {
    ByteLevel,
    Metaspace { replacement: char, prepend: Prepend },
    ByteFallback,
    Fuse,
    Strip { content: char, start: usize, stop: usize },
    Replace { pat: Pat, content: String },
    Bpe { suffix: String },
    Sequence(Vec<Decoder>),
}

impl Decoder {
    fn decode_chain(&self, tokens: Vec<String>) -> Result<Vec<String>> {
        Ok(match self {
            Decoder::ByteLevel => {
                let mut bytes = Vec::new();
                for t in &tokens {
                    match bytelevel_to_bytes(t) {
                        Some(b) => bytes.extend_from_slice(&b),
                        None => bytes.extend_from_slice(t.as_bytes()),
                    }
                }
                vec![String::from_utf8_lossy(&bytes).into_owned()]
            }
            Decoder::Metaspace { replacement, prepend } => tokens
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    t.chars()
                        .filter_map(|c| {
                            if c != *replacement {
                                Some(c)
                            } else if i == 0 && *prepend != Prepend::Never {
                                None
                            } else {
                                Some(' ')
                            }
                        })
                        .collect()
                })
                .collect(),
            Decoder::ByteFallback => {
                let mut out = Vec::with_capacity(tokens.len());
                let mut pending: Vec<u8> = Vec::new();
                let flush = |pending: &mut Vec<u8>, out: &mut Vec<String>| {
                    if pending.is_empty() {
                        return;
                    }
                    match String::from_utf8(std::mem::take(pending)) {
                        Ok(s) => out.push(s),
                        Err(e) => out.extend(e.as_bytes().iter().map(|_| "\u{FFFD}".to_string())),
                    }
                };
                for t in tokens {
                    let byte = (t.len() == 6 && t.starts_with("<0x") && t.ends_with('>'))
                        .then(|| u8::from_str_radix(&t[3..5], 16).ok())
                        .flatten();
                    match byte {
                        Some(b) => pending.push(b),
                        None => {
                            flush(&mut pending, &mut out);
                            out.push(t);
                        }
                    }
                }
                flush(&mut pending, &mut out);
                out
            }
            Decoder::Fuse => vec![tokens.concat()],
            Decoder::Strip { content, start, stop } => tokens
                .into_iter()
                .map(|t| {
                    let chars: Vec<char> = t.chars().collect();
                    let mut a = 0;
                    for (i, &c) in chars.iter().enumerate().take(*start) {
                        if c == *content {
                            a = i + 1;
                        } else {
                            break;
                        }
                    }
                    let mut b = chars.len();
                    for i in 0..(*stop).min(chars.len()) {
                        let k = chars.len() - i - 1;
                        if chars[k] == *content {
                            b = k;
                        } else {
                            break;
                        }
                    }
                    chars[a..b.max(a)].iter().collect()
                })
                .collect(),
            Decoder::Replace { pat, content } => {
                tokens.iter().map(|t| pat.replace(t, content)).collect::<Result<_>>()?
            }
            Decoder::Bpe { suffix } => {
                let n = tokens.len();
                tokens
                    .iter()
                    .enumerate()
                    .map(|(i, t)| t.replace(suffix.as_str(), if i + 1 == n { "" } else { " " }))
                    .collect()
            }
            Decoder::Sequence(items) => {
                let mut t = tokens;
                for d in items {
                    t = d.decode_chain(t)?;
                }
                t
            }
        })
    }
}

/// One entry of `added_tokens`.
#[derive(Debug, Clone)]
pub struct Added {
    pub content: String,
    pub id: u32,
    pub special: bool,
    pub lstrip: bool,
    pub rstrip: bool,
    pub single_word: bool,
    pub normalized: bool,
}

/// The added tokens and the two matchers HF builds: raw text (tokens with `normalized =
/// false`) and normalized text (the others, matched by their normalized content).
#[derive(Debug, Clone)]
struct AddedVocab {
    tokens: Vec<Added>,
    /// For each added token, its index in the tokenizer's special-token list (the policy).
    special_index: Vec<Option<usize>>,
    raw: Option<(AhoCorasick, Vec<usize>)>,
    norm: Option<(AhoCorasick, Vec<usize>)>,
}

fn matcher(pats: Vec<(String, usize)>) -> Result<Option<(AhoCorasick, Vec<usize>)>> {
    if pats.is_empty() {
        return Ok(None);
    }
    let ac = AhoCorasick::builder()
        .match_kind(MatchKind::LeftmostLongest)
        .build(pats.iter().map(|(s, _)| s.as_str()))
        .map_err(|e| Error::format(format!("cannot index the added tokens: {e}")))?;
    Ok(Some((ac, pats.into_iter().map(|(_, i)| i).collect())))
}

fn word_char_regex(which: usize) -> &'static Regex {
    use std::sync::OnceLock;
    static RES: OnceLock<[Regex; 2]> = OnceLock::new();
    &RES.get_or_init(|| {
        [Regex::new(r"\w$").expect("a valid regex"), Regex::new(r"^\w").expect("a valid regex")]
    })[which]
}

impl AddedVocab {
    /// HF's `AddedVocabulary::find_matches`: (Some(id) or None, start, end) covering `s`.
    fn split(
        &self,
        s: &str,
        which: &Option<(AhoCorasick, Vec<usize>)>,
        policy: &[SpecialPolicy],
    ) -> Result<Vec<(Option<u32>, usize, usize)>> {
        let Some((ac, idx)) = which else { return Ok(vec![(None, 0, s.len())]) };
        let mut out = Vec::new();
        let mut done = 0;
        for m in ac.find_iter(s) {
            let k = idx[m.pattern().as_usize()];
            let t = &self.tokens[k];
            if let Some(si) = self.special_index[k] {
                match policy.get(si) {
                    Some(SpecialPolicy::Allowed) => {}
                    Some(SpecialPolicy::Disallowed) => {
                        return Err(Error::DisallowedSpecial(t.content.clone()))
                    }
                    // Text, or no policy (`encode_ordinary`): the token is plain text.
                    _ => continue,
                }
            }
            let (mut a, mut b) = (m.start(), m.end());
            if t.single_word {
                let before = a == 0 || !word_char_regex(0).is_match(&s[..a]).unwrap_or(false);
                let after = b == s.len() || !word_char_regex(1).is_match(&s[b..]).unwrap_or(false);
                if !(before && after) {
                    continue;
                }
            }
            if t.lstrip {
                let trimmed = s[..a].trim_end_matches(char::is_whitespace).len();
                a = trimmed.max(done);
            }
            if t.rstrip {
                b += s[b..].len() - s[b..].trim_start_matches(char::is_whitespace).len();
            }
            if a < done {
                continue; // inside the whitespace an earlier token took
            }
            if done < a {
                out.push((None, done, a));
            }
            out.push((Some(t.id), a, b));
            done = b;
        }
        if done < s.len() {
            out.push((None, done, s.len()));
        }
        Ok(out)
    }
}

/// Everything beyond the byte-level fast path that an HF `tokenizer.json` asks for.
#[derive(Debug, Clone)]
pub struct Pipeline {
    normalizer: Option<Normalizer>,
    pre: Vec<Pre>,
    /// Whether the model reads raw bytes (a byte-level vocabulary behind a final ByteLevel).
    byte_model: bool,
    opts: WordOpts,
    added: AddedVocab,
    decoder: Option<Decoder>,
    /// The token string of each id, as HF's decoders see it (added tokens by content).
    vocab_r: Vec<Option<String>>,
    /// The file this came from (written back unchanged by `save_hf_json`).
    pub(crate) source: String,
    table: [char; 256],
}

impl Pipeline {
    /// The pieces the model sees for one text segment without added tokens.
    fn pre_tokenize(&self, s: &str, at_start: bool) -> Result<Vec<Piece>> {
        let mut pieces = vec![(s.to_string(), at_start)];
        let stages = if self.byte_model { &self.pre[..self.pre.len() - 1] } else { &self.pre[..] };
        for p in stages {
            pieces = p.run(pieces, &self.table)?;
            pieces.retain(|p| !p.0.is_empty());
        }
        if self.byte_model {
            // The final ByteLevel without the byte mapping (the model reads raw bytes); its
            // regex split happens in `encode`.
            if let Some(Pre::ByteLevel { add_prefix_space: true, .. }) = self.pre.last() {
                for p in &mut pieces {
                    if !p.0.starts_with(' ') {
                        p.0.insert(0, ' ');
                    }
                }
            }
        }
        Ok(pieces)
    }

    fn encode_segment(
        &self,
        bpe: &Bpe,
        s: &str,
        at_start: bool,
        scratch: &mut Scratch,
        out: &mut Vec<u32>,
    ) -> Result<()> {
        let regex = matches!(self.pre.last(), Some(Pre::ByteLevel { use_regex: true, .. }));
        for (p, _) in self.pre_tokenize(s, at_start)? {
            if self.byte_model {
                if regex {
                    Splitter::Gpt2.split(&p, |q| bpe.encode_piece(q.as_bytes(), scratch, out))?;
                } else {
                    bpe.encode_piece(p.as_bytes(), scratch, out);
                }
            } else {
                bpe.encode_word(&p, &self.opts, scratch, out);
            }
        }
        Ok(())
    }

    /// HF's `encode(text, add_special_tokens=False).ids`, with `policy` for special tokens.
    pub fn encode(
        &self,
        bpe: &Bpe,
        text: &str,
        policy: &[SpecialPolicy],
        scratch: &mut Scratch,
        out: &mut Vec<u32>,
    ) -> Result<()> {
        for (id, a, b) in self.added.split(text, &self.added.raw, policy)? {
            if let Some(id) = id {
                out.push(id);
                continue;
            }
            let seg = &text[a..b];
            let normed;
            let seg = match &self.normalizer {
                Some(n) => {
                    normed = n.normalize(seg)?;
                    normed.as_str()
                }
                None => seg,
            };
            for (id2, c, d) in self.added.split(seg, &self.added.norm, policy)? {
                match id2 {
                    Some(id) => out.push(id),
                    None => self.encode_segment(bpe, &seg[c..d], a == 0 && c == 0, scratch, out)?,
                }
            }
        }
        Ok(())
    }

    /// The pre-tokenized pieces of `text` (no added-token handling), as the model sees them.
    pub fn pieces(&self, text: &str) -> Result<Vec<String>> {
        let s = match &self.normalizer {
            Some(n) => n.normalize(text)?,
            None => text.to_string(),
        };
        Ok(self.pre_tokenize(&s, true)?.into_iter().map(|p| p.0).collect())
    }

    /// Each id's token string as HF shows it (`"▁hello"`, `"Ġhello"`, added tokens by content).
    pub fn token_strings(&self) -> &[Option<String>] {
        &self.vocab_r
    }

    /// HF's `decode(ids, skip_special_tokens)`; an id without a token is an error.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let mut tokens = Vec::with_capacity(ids.len());
        for &id in ids {
            if skip_special && self.added.tokens.iter().any(|t| t.id == id && t.special) {
                continue;
            }
            let t = self.vocab_r.get(id as usize).and_then(|t| t.as_ref()).ok_or_else(|| {
                Error::UnknownId { id: id as i128, valid: format!("0..{}", self.vocab_r.len()) }
            })?;
            tokens.push(t.clone());
        }
        Ok(match &self.decoder {
            Some(d) => d.decode_chain(tokens)?.concat(),
            None => tokens.join(" "),
        })
    }
}

// ---------------------------------------------------------------------------- parsing

fn ferr(msg: String) -> Error {
    Error::Format(format!("tokenizer.json: {msg}"))
}

fn get_str<'a>(v: &'a Value, path: &str, key: &str) -> Result<&'a str> {
    v.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| ferr(format!("{path}.{key} is missing or not a string")))
}

fn get_bool(v: &Value, path: &str, key: &str, default: bool) -> Result<bool> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ferr(format!("{path}.{key} is not a boolean"))),
    }
}

fn get_char(v: &Value, path: &str, key: &str) -> Result<char> {
    let s = get_str(v, path, key)?;
    let mut it = s.chars();
    match (it.next(), it.next()) {
        (Some(c), None) => Ok(c),
        _ => Err(ferr(format!("{path}.{key} = {s:?} must be a single character"))),
    }
}

fn parse_pat(v: &Value, path: &str) -> Result<Pat> {
    let p = v.get("pattern").ok_or_else(|| ferr(format!("{path} has no pattern")))?;
    if let Some(s) = p.get("String").and_then(Value::as_str) {
        return Ok(Pat::Str(s.to_string()));
    }
    if let Some(s) = p.get("Regex").and_then(Value::as_str) {
        // Bounded backtracking: a pathological pattern fails on the input instead of hanging.
        let re = fancy_regex::RegexBuilder::new(&super::formats::onig_to_fancy(s))
            .backtrack_limit(1_000_000)
            .build()
            .map_err(|e| ferr(format!("{path}.pattern.Regex {s:?} does not compile: {e}")))?;
        return Ok(Pat::Re(Box::new(re)));
    }
    Err(ferr(format!("{path}.pattern must be {{\"String\": ...}} or {{\"Regex\": ...}}")))
}

fn kind<'a>(v: &'a Value, path: &str) -> Result<&'a str> {
    v.get("type").and_then(Value::as_str).ok_or_else(|| ferr(format!("{path} has no \"type\"")))
}

fn list<'a>(v: &'a Value, path: &str, key: &str) -> Result<&'a Vec<Value>> {
    v.get(key).and_then(Value::as_array).ok_or_else(|| ferr(format!("{path}.{key} is not a list")))
}

fn unsupported(what: &str, t: &str, path: &str) -> Error {
    ferr(format!("{what} type {t:?} at {path} is not supported by ferrolm"))
}

fn parse_normalizer(v: &Value, path: &str) -> Result<Normalizer> {
    let t = kind(v, path)?;
    Ok(match t {
        "NFC" => Normalizer::Nfc,
        "NFD" => Normalizer::Nfd,
        "NFKC" => Normalizer::Nfkc,
        "NFKD" => Normalizer::Nfkd,
        "Lowercase" => Normalizer::Lowercase,
        "Strip" => Normalizer::Strip {
            left: get_bool(v, path, "strip_left", true)?,
            right: get_bool(v, path, "strip_right", true)?,
        },
        "Replace" => Normalizer::Replace {
            pat: parse_pat(v, path)?,
            content: get_str(v, path, "content")?.to_string(),
        },
        "Prepend" => Normalizer::Prepend(get_str(v, path, "prepend")?.to_string()),
        "BertNormalizer" => {
            let lowercase = get_bool(v, path, "lowercase", true)?;
            Normalizer::Bert {
                clean_text: get_bool(v, path, "clean_text", true)?,
                chinese: get_bool(v, path, "handle_chinese_chars", true)?,
                strip_accents: get_bool(v, path, "strip_accents", lowercase)?,
                lowercase,
            }
        }
        "Sequence" => Normalizer::Sequence(
            list(v, path, "normalizers")?
                .iter()
                .enumerate()
                .map(|(i, n)| parse_normalizer(n, &format!("{path}.normalizers[{i}]")))
                .collect::<Result<_>>()?,
        ),
        _ => return Err(unsupported("normalizer", t, path)),
    })
}

fn parse_behavior(v: &Value, path: &str, default: Behavior) -> Result<Behavior> {
    Ok(match v.get("behavior").and_then(Value::as_str) {
        None => default,
        Some("Removed") => Behavior::Removed,
        Some("Isolated") => Behavior::Isolated,
        Some("MergedWithPrevious") => Behavior::MergedWithPrevious,
        Some("MergedWithNext") => Behavior::MergedWithNext,
        Some("Contiguous") => Behavior::Contiguous,
        Some(b) => return Err(ferr(format!("{path}.behavior {b:?} is not a split behavior"))),
    })
}

fn parse_prepend(v: &Value, path: &str) -> Result<Prepend> {
    Ok(match v.get("prepend_scheme").and_then(Value::as_str) {
        Some("first") => Prepend::First,
        Some("always") => Prepend::Always,
        Some("never") => Prepend::Never,
        Some(s) => {
            return Err(ferr(format!("{path}.prepend_scheme {s:?} is not first/always/never")))
        }
        // Files from before prepend_scheme carry add_prefix_space.
        None if get_bool(v, path, "add_prefix_space", true)? => Prepend::Always,
        None => Prepend::Never,
    })
}

fn parse_pre(v: &Value, path: &str, out: &mut Vec<Pre>) -> Result<()> {
    let t = kind(v, path)?;
    out.push(match t {
        "ByteLevel" => Pre::ByteLevel {
            add_prefix_space: get_bool(v, path, "add_prefix_space", true)?,
            use_regex: get_bool(v, path, "use_regex", true)?,
            map: true,
        },
        "Split" => Pre::Split {
            pat: parse_pat(v, path)?,
            behavior: parse_behavior(v, path, Behavior::Isolated)?,
            invert: get_bool(v, path, "invert", false)?,
        },
        "Digits" => Pre::Digits { individual: get_bool(v, path, "individual_digits", false)? },
        "Metaspace" => Pre::Metaspace {
            replacement: get_char(v, path, "replacement")?,
            prepend: parse_prepend(v, path)?,
            split: get_bool(v, path, "split", true)?,
        },
        "Whitespace" => Pre::Whitespace,
        "WhitespaceSplit" => Pre::WhitespaceSplit,
        "BertPreTokenizer" => Pre::Bert,
        "Punctuation" => Pre::Punctuation(parse_behavior(v, path, Behavior::Isolated)?),
        "Sequence" => {
            for (i, p) in list(v, path, "pretokenizers")?.iter().enumerate() {
                parse_pre(p, &format!("{path}.pretokenizers[{i}]"), out)?;
            }
            return Ok(());
        }
        _ => return Err(unsupported("pre_tokenizer", t, path)),
    });
    Ok(())
}

fn parse_decoder(v: &Value, path: &str) -> Result<Decoder> {
    let t = kind(v, path)?;
    Ok(match t {
        "ByteLevel" => Decoder::ByteLevel,
        "Metaspace" => Decoder::Metaspace {
            replacement: get_char(v, path, "replacement")?,
            prepend: parse_prepend(v, path)?,
        },
        "ByteFallback" => Decoder::ByteFallback,
        "Fuse" => Decoder::Fuse,
        "Strip" => {
            let n = |k: &str| -> Result<usize> {
                v.get(k)
                    .and_then(Value::as_u64)
                    .map(|x| x as usize)
                    .ok_or_else(|| ferr(format!("{path}.{k} is not a non-negative integer")))
            };
            Decoder::Strip {
                content: get_char(v, path, "content")?,
                start: n("start")?,
                stop: n("stop")?,
            }
        }
        "Replace" => Decoder::Replace {
            pat: parse_pat(v, path)?,
            content: get_str(v, path, "content")?.to_string(),
        },
        "BPEDecoder" => Decoder::Bpe {
            suffix: v.get("suffix").and_then(Value::as_str).unwrap_or("</w>").to_string(),
        },
        "Sequence" => Decoder::Sequence(
            list(v, path, "decoders")?
                .iter()
                .enumerate()
                .map(|(i, d)| parse_decoder(d, &format!("{path}.decoders[{i}]")))
                .collect::<Result<_>>()?,
        ),
        _ => return Err(unsupported("decoder", t, path)),
    })
}

/// (ids before, ids after) a single sequence.
pub(crate) fn parse_post(v: &Value, path: &str) -> Result<(Vec<u32>, Vec<u32>)> {
    let t = kind(v, path)?;
    let pair_id = |key: &str| -> Result<u32> {
        v.get(key)
            .and_then(Value::as_array)
            .and_then(|a| a.get(1))
            .and_then(Value::as_u64)
            .and_then(|x| u32::try_from(x).ok())
            .ok_or_else(|| ferr(format!("{path}.{key} is not [token, id]")))
    };
    Ok(match t {
        "ByteLevel" => (vec![], vec![]),
        "RobertaProcessing" | "BertProcessing" => (vec![pair_id("cls")?], vec![pair_id("sep")?]),
        "TemplateProcessing" => {
            let specials = v.get("special_tokens").and_then(Value::as_object);
            let (mut pre, mut post) = (Vec::new(), Vec::new());
            let mut seen = false;
            for (i, item) in list(v, path, "single")?.iter().enumerate() {
                let ipath = format!("{path}.single[{i}]");
                if item.get("Sequence").is_some() {
                    if seen {
                        return Err(ferr(format!("{ipath}: a second sequence in `single`")));
                    }
                    seen = true;
                } else if let Some(name) =
                    item.get("SpecialToken").and_then(|s| s.get("id")).and_then(Value::as_str)
                {
                    let ids = specials
                        .and_then(|m| m.get(name))
                        .and_then(|s| s.get("ids"))
                        .and_then(Value::as_array)
                        .ok_or_else(|| {
                            ferr(format!(
                                "{ipath}: special token {name:?} is not in special_tokens"
                            ))
                        })?;
                    let dst = if seen { &mut post } else { &mut pre };
                    for x in ids {
                        dst.push(x.as_u64().and_then(|x| u32::try_from(x).ok()).ok_or_else(
                            || ferr(format!("{path}.special_tokens[{name:?}].ids holds a non-id")),
                        )?);
                    }
                } else {
                    return Err(ferr(format!("{ipath} is neither Sequence nor SpecialToken")));
                }
            }
            (pre, post)
        }
        "Sequence" => {
            let (mut pre, mut post) = (Vec::new(), Vec::new());
            for (i, p) in list(v, path, "processors")?.iter().enumerate() {
                let (a, b) = parse_post(p, &format!("{path}.processors[{i}]"))?;
                pre.splice(0..0, a);
                post.extend(b);
            }
            (pre, post)
        }
        _ => return Err(unsupported("post_processor", t, path)),
    })
}

/// The two token strings of `model.merges[i]`: `"A B"` (older files) or `["A", "B"]`.
pub(crate) fn merge_pair(m: &Value, i: usize) -> Result<(&str, &str)> {
    match m {
        Value::String(s) => match s.split_once(' ') {
            Some((a, b)) if !b.contains(' ') => Ok((a, b)),
            _ => Err(ferr(format!("model.merges[{i}] = {s:?} is not 'A B'"))),
        },
        Value::Array(v) => match &v[..] {
            [Value::String(a), Value::String(b)] => Ok((a.as_str(), b.as_str())),
            _ => Err(ferr(format!("model.merges[{i}] is not a pair of strings"))),
        },
        _ => Err(ferr(format!("model.merges[{i}] is neither 'A B' nor [A, B]"))),
    }
}

fn present(v: Option<&Value>) -> Option<&Value> {
    v.filter(|v| !v.is_null())
}

/// The pieces of a parsed `tokenizer.json` that [`super::Tokenizer`] holds.
pub struct Parsed {
    pub bpe: Bpe,
    pub specials: Vec<(String, u32)>,
    pub pipeline: Pipeline,
}

/// Reads any BPE `tokenizer.json` HF tokenizers reads with the components above.
pub fn parse(root: &Value, source: &str) -> Result<Parsed> {
    for key in ["truncation", "padding"] {
        if present(root.get(key)).is_some() {
            return Err(ferr(format!(
                "{key} is set; ferrolm does not apply it inside encode (set it to null and \
                 truncate or pad the ids yourself)"
            )));
        }
    }
    let model = root.get("model").ok_or_else(|| ferr("root has no field \"model\"".into()))?;
    if let Some(t) = model.get("type").and_then(Value::as_str) {
        if t != "BPE" {
            return Err(unsupported("model", t, "model"));
        }
    }
    if present(model.get("dropout")).is_some_and(|d| d.as_f64() != Some(0.0)) {
        return Err(ferr(
            "model.dropout is set; BPE dropout is random and ferrolm encodes deterministically \
             (set it to null)"
                .into(),
        ));
    }
    let opt_str = |key: &str| -> Result<Option<String>> {
        match present(model.get(key)) {
            None => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(ferr(format!("model.{key} is not a string"))),
        }
    };
    let prefix = opt_str("continuing_subword_prefix")?;
    let suffix = opt_str("end_of_word_suffix")?;
    let byte_fallback = get_bool(model, "model", "byte_fallback", false)?;

    let normalizer =
        present(root.get("normalizer")).map(|n| parse_normalizer(n, "normalizer")).transpose()?;
    let mut pre = Vec::new();
    if let Some(p) = present(root.get("pre_tokenizer")) {
        parse_pre(p, "pre_tokenizer", &mut pre)?;
    }
    let decoder = present(root.get("decoder")).map(|d| parse_decoder(d, "decoder")).transpose()?;

    // Added tokens.
    let mut added = Vec::new();
    if let Some(a) = present(root.get("added_tokens")) {
        let a = a.as_array().ok_or_else(|| ferr("added_tokens is not a list".into()))?;
        for (i, t) in a.iter().enumerate() {
            let path = format!("added_tokens[{i}]");
            let content = get_str(t, &path, "content")?.to_string();
            let id = t
                .get("id")
                .and_then(Value::as_u64)
                .filter(|&x| x < (1 << 31))
                .ok_or_else(|| ferr(format!("{path}.id is not a token id")))?
                as u32;
            if content.is_empty() {
                return Err(ferr(format!("{path}.content is empty")));
            }
            let special = get_bool(t, &path, "special", false)?;
            added.push(Added {
                content,
                id,
                special,
                lstrip: get_bool(t, &path, "lstrip", false)?,
                rstrip: get_bool(t, &path, "rstrip", false)?,
                single_word: get_bool(t, &path, "single_word", false)?,
                normalized: get_bool(t, &path, "normalized", !special)?,
            });
        }
    }

    // The vocabulary: token strings by id.
    let vocab = model
        .get("vocab")
        .and_then(Value::as_object)
        .ok_or_else(|| ferr("model.vocab is missing or not an object".into()))?;
    let mut strings: Vec<Option<String>> = Vec::new();
    for (s, id) in vocab {
        let id = id
            .as_u64()
            .filter(|&x| x < (1 << 31) && (x as usize) <= vocab.len() * 4 + 1024)
            .ok_or_else(|| ferr(format!("model.vocab[{s:?}] is not a plausible token id")))?
            as usize;
        if s.is_empty() {
            return Err(ferr("model.vocab holds the empty string".into()));
        }
        if strings.len() <= id {
            strings.resize(id + 1, None);
        }
        if strings[id].is_some() {
            return Err(ferr(format!("model.vocab uses id {id} twice")));
        }
        strings[id] = Some(s.clone());
    }
    let lookup =
        |s: &str, i: usize| -> Result<u32> {
            vocab.get(s).and_then(Value::as_u64).map(|x| x as u32).ok_or_else(|| {
                ferr(format!("model.merges[{i}] uses {s:?}, which is not in the vocab"))
            })
        };
    let mut merges = Vec::new();
    for (i, m) in list(model, "model", "merges")?.iter().enumerate() {
        let (a, b) = merge_pair(m, i)?;
        merges.push((lookup(a, i)?, lookup(b, i)?));
    }

    // The byte-level fast model: ByteLevel ends the pre-tokenizer and every token is ByteLevel
    // text; the model then reads the raw bytes of each piece.
    let ends_bytelevel = matches!(pre.last(), Some(Pre::ByteLevel { .. }));
    let byte_tokens: Option<Vec<Option<Box<[u8]>>>> =
        (ends_bytelevel && prefix.is_none() && suffix.is_none() && !byte_fallback)
            .then(|| {
                strings
                    .iter()
                    .map(|s| match s {
                        None => Some(None),
                        Some(s) => bytelevel_to_bytes(s).map(|b| Some(b.into_boxed_slice())),
                    })
                    .collect()
            })
            .flatten();
    let byte_model = byte_tokens.is_some();
    if byte_model {
        if let Some(Pre::ByteLevel { map, .. }) = pre.last_mut() {
            *map = false;
        }
    }
    let tokens = match byte_tokens {
        Some(t) => t,
        None => strings
            .iter()
            .map(|s| s.as_ref().map(|s| s.as_bytes().to_vec().into_boxed_slice()))
            .collect(),
    };
    let mut bpe =
        Bpe::from_merges_with(tokens, merges, prefix.as_deref().map(str::as_bytes), byte_model)
            .map_err(|e| ferr(format!("model: {e}")))?;
    let unk = match present(model.get("unk_token")) {
        None => None,
        Some(Value::String(s)) => Some(
            vocab
                .get(s)
                .and_then(Value::as_u64)
                .map(|x| x as u32)
                .or_else(|| added.iter().find(|a| &a.content == s).map(|a| a.id))
                .ok_or_else(|| {
                    ferr(format!(
                        "model.unk_token {s:?} is neither in the vocab nor an added token"
                    ))
                })?,
        ),
        Some(_) => return Err(ferr("model.unk_token is not a string".into())),
    };
    bpe = bpe.with_unknown(unk, get_bool(model, "model", "fuse_unk", false)?);
    if get_bool(model, "model", "ignore_merges", false)? {
        bpe = bpe.with_ignore_merges();
    }
    let fallback = byte_fallback.then(|| {
        let mut t = Box::new([u32::MAX; 256]);
        for (b, slot) in t.iter_mut().enumerate() {
            if let Some(id) = vocab.get(&format!("<0x{b:02X}>")).and_then(Value::as_u64) {
                *slot = id as u32;
            }
        }
        t
    });

    // Decoding sees added tokens by content (normalized when they match normalized text, as HF
    // shows them), model tokens by their vocab string.
    let mut vocab_r = strings;
    for a in &added {
        let i = a.id as usize;
        if vocab_r.len() <= i {
            vocab_r.resize(i + 1, None);
        }
        vocab_r[i] = Some(match (&normalizer, a.normalized) {
            (Some(n), true) => n.normalize(&a.content)?,
            _ => a.content.clone(),
        });
    }
    let specials: Vec<(String, u32)> =
        added.iter().filter(|a| a.special).map(|a| (a.content.clone(), a.id)).collect();
    let mut special_index = Vec::with_capacity(added.len());
    let mut k = 0;
    for a in &added {
        special_index.push(a.special.then(|| {
            k += 1;
            k - 1
        }));
    }
    let mut raw = Vec::new();
    let mut norm = Vec::new();
    for (i, a) in added.iter().enumerate() {
        if a.normalized {
            let c = match &normalizer {
                Some(n) => n.normalize(&a.content)?,
                None => a.content.clone(),
            };
            if !c.is_empty() {
                norm.push((c, i));
            }
        } else {
            raw.push((a.content.clone(), i));
        }
    }
    let added =
        AddedVocab { raw: matcher(raw)?, norm: matcher(norm)?, tokens: added, special_index };
    let pipeline = Pipeline {
        normalizer,
        pre,
        byte_model,
        opts: WordOpts { prefix, suffix, byte_fallback: fallback },
        added,
        decoder,
        vocab_r,
        source: source.to_string(),
        table: byte_to_char(),
    };
    Ok(Parsed { bpe, specials, pipeline })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaviors_follow_hf() {
        // "the-final--countdown" split on '-' (HF's own doc examples).
        let s = "the-final--countdown";
        let m = || char_matches(s, |c| c == '-');
        let cut = |b| -> Vec<&str> {
            apply_behavior(m(), b, false).into_iter().map(|(a, z)| &s[a..z]).collect()
        };
        assert_eq!(cut(Behavior::Removed), ["the", "final", "countdown"]);
        assert_eq!(cut(Behavior::Isolated), ["the", "-", "final", "-", "-", "countdown"]);
        assert_eq!(cut(Behavior::MergedWithPrevious), ["the-", "final-", "-", "countdown"]);
        assert_eq!(cut(Behavior::MergedWithNext), ["the", "-final", "-", "-countdown"]);
        assert_eq!(cut(Behavior::Contiguous), ["the", "-", "final", "--", "countdown"]);
    }

    #[test]
    fn strip_decoder_never_panics() {
        // HF's own Strip panics on these; here a token can be stripped to nothing.
        let d = Decoder::Strip { content: '_', start: 3, stop: 5 };
        let out = d.decode_chain(vec!["_".into(), "".into(), "__a_".into()]).unwrap();
        assert_eq!(out, ["", "", "a"]);
    }

    #[test]
    fn unknown_components_name_their_path() {
        let v: Value = serde_json::json!({"type": "Sequence", "normalizers": [{"type": "Nope"}]});
        let e = parse_normalizer(&v, "normalizer").unwrap_err().to_string();
        assert!(e.contains("normalizer.normalizers[0]") && e.contains("Nope"), "{e}");
    }
}
