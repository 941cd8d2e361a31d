//! Unicode character classes for the hand-written pre-tokenizers.
//!
//! The classes are read out of `regex-syntax` (the parser under the `regex` and `fancy-regex`
//! crates, so under tiktoken too) at first use, rather than copied from another Unicode table:
//! `\p{L}`, `\p{N}` and `\s` then mean exactly what they mean to the regex engines that the
//! patterns were written for. Lookup: a 64 KiB table for the Basic Multilingual Plane and a
//! binary search over ranges above it.

use std::sync::OnceLock;

use regex_syntax::hir::{Class, HirKind};

/// Letter (`\p{L}`).
pub const LETTER: u8 = 1;
/// Number (`\p{N}`).
pub const NUMBER: u8 = 2;
/// Unicode White_Space (`\s`).
pub const SPACE: u8 = 3;
/// Anything else (`[^\s\p{L}\p{N}]`).
pub const OTHER: u8 = 0;

struct Tables {
    bmp: Vec<u8>,
    astral: Vec<(u32, u32, u8)>,
    /// For the case-insensitive contractions of cl100k: bit k set when the char folds to the
    /// k-th letter of "sdmtlvre".
    fold: Vec<(char, u8)>,
}

fn ranges(pattern: &str) -> Vec<(u32, u32)> {
    let hir = regex_syntax::Parser::new().parse(pattern).expect("static class pattern parses");
    match hir.kind() {
        HirKind::Class(Class::Unicode(c)) => {
            c.ranges().iter().map(|r| (r.start() as u32, r.end() as u32)).collect()
        }
        HirKind::Literal(lit) => {
            let s = std::str::from_utf8(&lit.0).expect("literal is UTF-8");
            s.chars().map(|c| (c as u32, c as u32)).collect()
        }
        other => panic!("unexpected HIR for {pattern}: {other:?}"),
    }
}

fn tables() -> &'static Tables {
    static T: OnceLock<Tables> = OnceLock::new();
    T.get_or_init(|| {
        let mut bmp = vec![OTHER; 0x10000];
        let mut astral = Vec::new();
        // Later classes win; the three are disjoint in Unicode, so order does not matter.
        for (pat, class) in [(r"\p{L}", LETTER), (r"\p{N}", NUMBER), (r"\s", SPACE)] {
            for (lo, hi) in ranges(pat) {
                for cp in lo..=hi.min(0xFFFF) {
                    bmp[cp as usize] = class;
                }
                if hi > 0xFFFF {
                    astral.push((lo.max(0x10000), hi, class));
                }
            }
        }
        astral.sort_unstable();
        let mut fold = Vec::new();
        for (k, letter) in "sdmtlvre".chars().enumerate() {
            for (lo, hi) in ranges(&format!("(?i:{letter})")) {
                for cp in lo..=hi {
                    let c = char::from_u32(cp).expect("class holds scalar values");
                    match fold.iter_mut().find(|(f, _)| *f == c) {
                        Some((_, bits)) => *bits |= 1 << k,
                        None => fold.push((c, 1u8 << k)),
                    }
                }
            }
        }
        Tables { bmp, astral, fold }
    })
}

/// Forces the tables to be built (so the first encode call does not pay for it).
pub fn init() {
    tables();
}

/// The class of a code point: [`LETTER`], [`NUMBER`], [`SPACE`] or [`OTHER`].
#[inline]
pub fn class_of(c: char) -> u8 {
    let cp = c as u32;
    let t = tables();
    if cp < 0x10000 {
        // SAFETY-free: the table has exactly 0x10000 entries.
        t.bmp[cp as usize]
    } else {
        match t.astral.binary_search_by(|&(lo, hi, _)| {
            if hi < cp {
                std::cmp::Ordering::Less
            } else if lo > cp {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        }) {
            Ok(i) => t.astral[i].2,
            Err(_) => OTHER,
        }
    }
}

/// Whether `c` matches the case-insensitive letter at `k` in "sdmtlvre" (Unicode simple case
/// folding, as `(?i)` in the regex crate: `ſ` matches `s`).
#[inline]
pub fn folds_to(c: char, k: usize) -> bool {
    if c.is_ascii() {
        return c.to_ascii_lowercase() == "sdmtlvre".as_bytes()[k] as char;
    }
    tables().fold.iter().any(|&(f, bits)| f == c && bits & (1 << k) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_match_expectations() {
        assert_eq!(class_of('a'), LETTER);
        assert_eq!(class_of('中'), LETTER);
        assert_eq!(class_of('7'), NUMBER);
        assert_eq!(class_of('½'), NUMBER);
        assert_eq!(class_of(' '), SPACE);
        assert_eq!(class_of('\u{3000}'), SPACE);
        assert_eq!(class_of('\u{85}'), SPACE);
        assert_eq!(class_of('!'), OTHER);
        assert_eq!(class_of('👍'), OTHER);
        assert_eq!(class_of('\u{1D400}'), LETTER); // mathematical bold A
        assert_eq!(class_of('\u{1D7CE}'), NUMBER); // mathematical bold digit zero
    }

    #[test]
    fn long_s_folds_to_s() {
        assert!(folds_to('\u{17F}', 0));
        assert!(folds_to('S', 0));
        assert!(!folds_to('x', 0));
    }
}
