//! Pre-tokenization: splitting text into the pieces that BPE encodes one by one.
//!
//! Performance note: tiktoken spends about a third of
//! its encode time in fancy-regex's backtracking search. The GPT-2 (`r50k`) and `cl100k`
//! patterns are implemented here as hand-written scanners that reproduce the regex's
//! leftmost-first, backtracking result exactly (the tests compare them with fancy-regex on
//! random strings built from every character class, and the Python tests compare the ids with
//! tiktoken). Any other pattern runs on fancy-regex.
//!
//! llama.cpp (and HF's `Sequence` pre-tokenizer) chain several patterns: each splits the pieces
//! of the one before, and the text between matches stays as pieces of its own. [`Splitter::chain`]
//! builds that; a chain costs only the tokenizers that have one, and `\p{N}` (digits one by one,
//! SmolLM's first stage) is a scanner too.

use fancy_regex::Regex;

use super::chars::{class_of, folds_to, LETTER, NUMBER, OTHER, SPACE};
use crate::{Error, Result};

/// tiktoken's pattern for GPT-2 (`r50k_base`, `p50k_base`), the default.
pub const GPT2_PATTERN: &str =
    r"'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s";
/// The pattern of the original GPT-2 release and of HF's ByteLevel pre-tokenizer (same pieces).
pub const GPT2_PATTERN_ORIGINAL: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// tiktoken's `cl100k_base` pattern.
pub const CL100K_PATTERN: &str = concat!(
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+|",
    r" ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"
);

/// cl100k's pattern as HF tokenizers must be given it: its regex engine (Oniguruma) reads
/// `{1,3}+` as "one or more times up to three", not as a possessive `{1,3}`. Both engines read
/// this spelling the same way, and it cuts the same pieces as [`CL100K_PATTERN`].
pub const CL100K_PATTERN_HF: &str = concat!(
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}|",
    r" ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"
);

/// GPT-2's pattern as llama.cpp spells it (no final `\s+`; llama.cpp's own scanner for it
/// keeps unmatched whitespace as pieces, which cuts the same pieces as [`GPT2_PATTERN`]).
pub const GPT2_PATTERN_LLAMACPP: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Each number char on its own (llama.cpp's first stage for SmolLM, StarCoder ...; HF
/// `Digits(individual_digits=True)`).
pub const DIGITS_PATTERN: &str = r"\p{N}";
/// llama.cpp's Llama-3 pattern (`llama-bpe`): HF's with the case-insensitive contractions
/// spelled out for ASCII only.
pub const LLAMA3_PATTERN: &str = concat!(
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|",
    r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);
/// llama.cpp's Qwen2 pattern: Llama-3's with single digits.
pub const QWEN2_PATTERN: &str = concat!(
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|",
    r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

/// The patterns llama.cpp chains for a GGUF `tokenizer.ggml.pre` name (`src/llama-vocab.cpp`),
/// or `None` for a name ferrolm does not know.
pub fn llama_cpp_patterns(pre: &str) -> Option<Vec<&'static str>> {
    Some(match pre {
        "default" => {
            vec![r"[\p{P}\$\+<=>\^~\|]+", GPT2_PATTERN_LLAMACPP, r"\p{N}+", "[0-9][0-9][0-9]"]
        }
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "dbrx" | "smaug-bpe" => {
            vec![LLAMA3_PATTERN]
        }
        "qwen2" | "deepseek-r1-qwen" | "megrez" | "stablelm2" => vec![QWEN2_PATTERN],
        "gpt-2" | "phi-2" | "mpt" | "olmo" | "jais" | "exaone4" => vec![GPT2_PATTERN_LLAMACPP],
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            vec![DIGITS_PATTERN, GPT2_PATTERN_LLAMACPP]
        }
        _ => return None,
    })
}

/// The `tokenizer.ggml.pre` names [`llama_cpp_patterns`] knows (for error messages).
pub const LLAMA_CPP_PRE_NAMES: &[&str] = &[
    "default",
    "llama3",
    "llama-v3",
    "llama-bpe",
    "falcon3",
    "dbrx",
    "smaug-bpe",
    "qwen2",
    "deepseek-r1-qwen",
    "megrez",
    "stablelm2",
    "gpt-2",
    "phi-2",
    "mpt",
    "olmo",
    "jais",
    "exaone4",
    "smollm",
    "starcoder",
    "refact",
    "command-r",
    "codeshell",
    "exaone",
    "minerva-7b",
];

/// A pre-tokenizer: one of the hand-written scanners or a compiled regex.
#[derive(Debug, Clone)]
pub enum Splitter {
    /// GPT-2's pattern (any spelling above).
    Gpt2,
    /// cl100k's pattern.
    Cl100k,
    /// `\p{N}`: each number char is a piece; the text between them too.
    Digits,
    /// Any other pattern. Text the pattern does not match is skipped, as in tiktoken (inside a
    /// chain it is kept as a piece, as in llama.cpp).
    Regex(Box<Regex>),
    /// Stages, each splitting the pieces of the one before (llama.cpp, HF `Sequence`).
    Chain(Vec<Splitter>),
}

impl Splitter {
    /// The splitter for `pattern`: a hand-written scanner when the pattern is one of the known
    /// ones, else fancy-regex.
    pub fn new(pattern: &str) -> Result<Self> {
        super::chars::init();
        if pattern == GPT2_PATTERN
            || pattern == GPT2_PATTERN_ORIGINAL
            || pattern == GPT2_PATTERN_LLAMACPP
        {
            return Ok(Splitter::Gpt2);
        }

        if pattern == CL100K_PATTERN || pattern == CL100K_PATTERN_HF {
            return Ok(Splitter::Cl100k);
        }
        Self::regex(pattern)
    }

    /// The splitter for one pattern, or for a chain of several (llama.cpp's `regex_exprs`).
    pub fn from_patterns<S: AsRef<str>>(patterns: &[S]) -> Result<Self> {
        match patterns {
            [] => Err(Error::value("a pre-tokenizer needs at least one pattern")),
            [one] => Self::new(one.as_ref()),
            many => Ok(Splitter::Chain(
                many.iter()
                    .map(|p| match p.as_ref() {
                        DIGITS_PATTERN => Ok(Splitter::Digits),
                        p => Self::new(p),
                    })
                    .collect::<Result<_>>()?,
            )),
        }
    }

    /// Always the regex engine, even for the known patterns (for differential tests).
    pub fn regex(pattern: &str) -> Result<Self> {
        let re = Regex::new(pattern).map_err(|e| {
            Error::value(format!("pre-tokenizer pattern {pattern:?} does not compile: {e}"))
        })?;
        Ok(Splitter::Regex(Box::new(re)))
    }

    /// Calls `f` on each piece of `text`, in order.
    #[inline]
    pub fn split<'t>(&self, text: &'t str, mut f: impl FnMut(&'t str)) -> Result<()> {
        match self {
            Splitter::Gpt2 => scan(text, gpt2_next, f),
            Splitter::Cl100k => scan(text, cl100k_next, f),
            Splitter::Digits => scan(text, digits_next, f),
            Splitter::Chain(stages) => chain(stages, text, &mut |p| {
                f(p);
                Ok(())
            }),
            Splitter::Regex(re) => {
                for m in re.find_iter(text) {
                    let m = m.map_err(|e| {
                        Error::value(format!("pre-tokenizer regex failed on the input: {e}"))
                    })?;
                    if !m.as_str().is_empty() {
                        f(m.as_str());
                    }
                }
                Ok(())
            }
        }
    }

    /// The pieces of `text` as a vector (convenience for tests and callers that need them).
    pub fn pieces<'t>(&self, text: &'t str) -> Result<Vec<&'t str>> {
        let mut v = Vec::new();
        self.split(text, |p| v.push(p))?;
        Ok(v)
    }
}

/// Splits `text` with `stages[0]`, keeping the text between matches, and each piece with the
/// remaining stages.
fn chain<'t>(
    stages: &[Splitter],
    text: &'t str,
    f: &mut dyn FnMut(&'t str) -> Result<()>,
) -> Result<()> {
    let Some((first, rest)) = stages.split_first() else {
        return f(text);
    };
    let mut inner = |piece: &'t str| -> Result<()> {
        if rest.is_empty() {
            f(piece)
        } else {
            chain(rest, piece, f)
        }
    };
    match first {
        Splitter::Regex(re) => {
            let mut last = 0;
            for m in re.find_iter(text) {
                let m = m.map_err(|e| {
                    Error::value(format!("pre-tokenizer regex failed on the input: {e}"))
                })?;
                if m.start() == m.end() {
                    continue;
                }
                if m.start() > last {
                    inner(&text[last..m.start()])?;
                }
                inner(m.as_str())?;
                last = m.end();
            }
            if last < text.len() {
                inner(&text[last..])?;
            }
            Ok(())
        }
        Splitter::Chain(sub) => chain(sub, text, &mut inner),
        // The scanners cover all of the text, so there is nothing between their pieces.
        scanner => {
            let mut res = Ok(());
            scanner.split(text, |p| {
                if res.is_ok() {
                    res = inner(p);
                }
            })?;
            res
        }
    }
}

/// `\p{N}` with the text between kept: one number char, or the run of other chars up to the
/// next one.
fn digits_next(b: &[u8], i: usize) -> usize {
    let is_number = |j: usize| -> (bool, usize) {
        let x = b[j];
        if x < 0x80 {
            (x.is_ascii_digit(), 1)
        } else {
            let (c, l) = decode(b, j);
            (class_of(c) == NUMBER, l)
        }
    };
    let (num, l) = is_number(i);
    if num {
        return i + l;
    }
    let mut j = i + l;
    while j < b.len() {
        let (num, l) = is_number(j);
        if num {
            break;
        }
        j += l;
    }
    j
}

#[inline(always)]
fn scan<'t>(
    text: &'t str,
    next: fn(&[u8], usize) -> usize,
    mut f: impl FnMut(&'t str),
) -> Result<()> {
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let j = next(b, i);
        debug_assert!(j > i && text.is_char_boundary(j));
        // `next` only ever stops on char boundaries (it advances by whole UTF-8 sequences).
        f(&text[i..j]);
        i = j;
    }
    Ok(())
}

/// Decodes the char starting at byte `i` of valid UTF-8 `b`: (char, its length in bytes).
#[inline(always)]
fn decode(b: &[u8], i: usize) -> (char, usize) {
    let x = b[i];
    if x < 0x80 {
        return (x as char, 1);
    }
    let len = if x >= 0xF0 {
        4
    } else if x >= 0xE0 {
        3
    } else {
        2
    };
    let mut cp = (x as u32) & (0x7F >> len);
    for k in 1..len {
        cp = (cp << 6) | (b[i + k] as u32 & 0x3F);
    }
    // The bytes come from a `&str`, so this is a scalar value; fall back to U+FFFD rather
    // than trust it blindly.
    (char::from_u32(cp).unwrap_or('\u{FFFD}'), len)
}

/// End of the run of chars of `class` starting at `j`.
#[inline(always)]
fn run(b: &[u8], mut j: usize, class: u8) -> usize {
    while j < b.len() {
        let (c, l) = decode(b, j);
        if class_of(c) != class {
            break;
        }
        j += l;
    }
    j
}

/// `\s++$|\s+(?!\S)|\s` (GPT-2), with `cl100k` adding `\s*[\r\n]` after the `$` branch.
#[inline(always)]
fn whitespace(b: &[u8], i: usize, newline_branch: bool) -> usize {
    let mut j = i;
    let mut last = i;
    let mut last_nl = usize::MAX;
    while j < b.len() {
        let (c, l) = decode(b, j);
        if class_of(c) != SPACE {
            break;
        }
        if c == '\n' || c == '\r' {
            last_nl = j;
        }
        last = j;
        j += l;
    }
    if j == b.len() {
        return j; // \s++$
    }
    if newline_branch && last_nl != usize::MAX {
        return last_nl + 1; // \s*[\r\n]: up to the last newline of the run
    }
    if last > i {
        last // \s+(?!\S): all but the last char of the run
    } else {
        j // \s: one char
    }
}

/// One GPT-2 piece starting at `i`: `'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++|
/// ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s`.
fn gpt2_next(b: &[u8], i: usize) -> usize {
    let n = b.len();
    let (c, cl) = decode(b, i);
    if c == '\'' && i + 1 < n {
        if matches!(b[i + 1], b's' | b'd' | b'm' | b't') {
            return i + 2;
        }
        if i + 2 < n && matches!((b[i + 1], b[i + 2]), (b'l', b'l') | (b'v', b'e') | (b'r', b'e')) {
            return i + 3;
        }
    }
    let class = class_of(c);
    if class != SPACE {
        return run(b, i + cl, class);
    }
    if c == ' ' && i + 1 < n {
        let (c2, l2) = decode(b, i + 1);
        let k2 = class_of(c2);
        if k2 != SPACE {
            return run(b, i + 1 + l2, k2);
        }
    }
    whitespace(b, i, false)
}

/// The end of `(?i:[sdmt]|ll|ve|re)` at `p`, if it matches.
#[inline]
fn contraction_ci(b: &[u8], p: usize) -> Option<usize> {
    if p >= b.len() {
        return None;
    }
    let (c1, l1) = decode(b, p);
    if (0..4).any(|k| folds_to(c1, k)) {
        return Some(p + l1);
    }
    if p + l1 >= b.len() {
        return None;
    }
    let (c2, l2) = decode(b, p + l1);
    // "sdmtlvre": l = 4, v = 5, r = 6, e = 7.
    let two = (folds_to(c1, 4) && folds_to(c2, 4))
        || (folds_to(c1, 5) && folds_to(c2, 7))
        || (folds_to(c1, 6) && folds_to(c2, 7));
    two.then_some(p + l1 + l2)
}

/// `[\r\n]*` from `j`.
#[inline(always)]
fn newlines(b: &[u8], mut j: usize) -> usize {
    while j < b.len() && (b[j] == b'\r' || b[j] == b'\n') {
        j += 1;
    }
    j
}

/// One cl100k piece starting at `i`: `'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|
/// \p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s`.
fn cl100k_next(b: &[u8], i: usize) -> usize {
    let n = b.len();
    let (c, cl) = decode(b, i);
    if c == '\'' {
        if let Some(e) = contraction_ci(b, i + 1) {
            return e;
        }
    }
    let class = class_of(c);
    if class == LETTER {
        return run(b, i + cl, LETTER);
    }
    if class == NUMBER {
        let mut j = i + cl;
        for _ in 0..2 {
            if j >= n {
                break;
            }
            let (c2, l2) = decode(b, j);
            if class_of(c2) != NUMBER {
                break;
            }
            j += l2;
        }
        return j;
    }
    // c is OTHER or SPACE: one optional char that is not \r, \n, a letter or a number, then
    // letters.
    if c != '\r' && c != '\n' && i + cl < n {
        let (c2, l2) = decode(b, i + cl);
        if class_of(c2) == LETTER {
            return run(b, i + cl + l2, LETTER);
        }
    }
    if class == OTHER {
        return newlines(b, run(b, i + cl, OTHER));
    }
    if c == ' ' && i + 1 < n {
        let (c2, l2) = decode(b, i + 1);
        if class_of(c2) == OTHER {
            return newlines(b, run(b, i + 1 + l2, OTHER));
        }
    }
    whitespace(b, i, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One or more characters of each class the patterns distinguish, and the traps the notes
    /// name (case folding, U+3000, U+0085, `\r`).
    const ALPHABET: &[char] = &[
        'a',
        'Z',
        's',
        'S',
        't',
        'l',
        'L',
        'v',
        'e',
        'E',
        'r',
        'd',
        'm',
        'x',
        '\u{17F}',
        'é',
        '中',
        'ß',
        '\u{1D400}',
        '0',
        '9',
        '½',
        '\u{0663}',
        ' ',
        ' ',
        ' ',
        '\t',
        '\n',
        '\n',
        '\r',
        '\u{0B}',
        '\u{0C}',
        '\u{85}',
        '\u{A0}',
        '\u{3000}',
        '\u{2028}',
        '\'',
        '\'',
        '!',
        '.',
        ',',
        '-',
        '$',
        '👍',
        '\u{0301}',
        '\u{200D}',
        '\u{1F}',
        '\u{0}',
        '_',
        '/',
    ];

    fn differential(fast: &Splitter, pattern: &str) {
        let slow = Splitter::regex(pattern).unwrap();
        let mut rng = crate::testutil::Lcg(0x5eed);
        for case in 0..40_000 {
            let len = 1 + (rng.next_u31() % 12) as usize;
            let s: String =
                (0..len).map(|_| ALPHABET[(rng.next_u31() as usize) % ALPHABET.len()]).collect();
            let a = fast.pieces(&s).unwrap();
            let b = slow.pieces(&s).unwrap();
            assert_eq!(a, b, "case {case}: {s:?}");
        }
    }

    #[test]
    fn gpt2_scanner_matches_regex() {
        let fast = Splitter::new(GPT2_PATTERN).unwrap();
        assert!(matches!(fast, Splitter::Gpt2));
        differential(&fast, GPT2_PATTERN);
        differential(&fast, GPT2_PATTERN_ORIGINAL);
    }

    #[test]
    fn cl100k_scanner_matches_regex() {
        let fast = Splitter::new(CL100K_PATTERN).unwrap();
        assert!(matches!(fast, Splitter::Cl100k));
        differential(&fast, CL100K_PATTERN);
        differential(&fast, CL100K_PATTERN_HF);
    }

    #[test]
    fn known_pieces() {
        let g = Splitter::Gpt2;
        assert_eq!(
            g.pieces("Hello world's  end\n").unwrap(),
            ["Hello", " world", "'s", " ", " end", "\n"]
        );
        assert_eq!(g.pieces(" 'store").unwrap(), [" '", "store"]);
        let c = Splitter::Cl100k;
        assert_eq!(c.pieces("x  \n  ").unwrap(), ["x", "  \n  "]);
        assert_eq!(c.pieces("12345 ab\tcd").unwrap(), ["123", "45", " ab", "\tcd"]);
    }

    #[test]
    fn llama_cpp_chains() {
        let smollm = Splitter::from_patterns(&llama_cpp_patterns("smollm").unwrap()).unwrap();
        assert_eq!(
            smollm.pieces("Hello world! 123").unwrap(),
            ["Hello", " world", "!", " ", "1", "2", "3"]
        );
        assert_eq!(
            smollm.pieces("a  12x\u{0663}").unwrap(),
            ["a", "  ", "1", "2", "x", "\u{0663}"]
        );
        // The digit scanner against the same chain on the regex engine.
        let slow = Splitter::Chain(vec![
            Splitter::regex(DIGITS_PATTERN).unwrap(),
            Splitter::regex(GPT2_PATTERN_ORIGINAL).unwrap(),
        ]);
        let mut rng = crate::testutil::Lcg(0xd1d1);
        for case in 0..20_000 {
            let len = 1 + (rng.next_u31() % 12) as usize;
            let s: String =
                (0..len).map(|_| ALPHABET[(rng.next_u31() as usize) % ALPHABET.len()]).collect();
            assert_eq!(smollm.pieces(&s).unwrap(), slow.pieces(&s).unwrap(), "case {case}: {s:?}");
        }
        // llama.cpp's default keeps the text between matches of each stage.
        let default = Splitter::from_patterns(&llama_cpp_patterns("default").unwrap()).unwrap();
        assert_eq!(default.pieces("ab, 12345!").unwrap(), ["ab", ",", " ", "123", "45", "!"]);
        let llama3 = Splitter::from_patterns(&llama_cpp_patterns("llama-bpe").unwrap()).unwrap();
        assert_eq!(llama3.pieces("x  \n  ").unwrap(), ["x", "  \n", "  "]);
        assert_eq!(llama3.pieces("'S 'ſ").unwrap(), ["'S", " '", "ſ"]);
        assert!(llama_cpp_patterns("no-such-pre").is_none());
        for name in LLAMA_CPP_PRE_NAMES {
            Splitter::from_patterns(&llama_cpp_patterns(name).unwrap()).unwrap();
        }
    }

    #[test]
    fn bad_pattern_is_an_error() {
        assert!(Splitter::new("(unclosed").is_err());
    }
}
