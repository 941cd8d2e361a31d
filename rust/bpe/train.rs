//! BPE training: count pre-tokenized words in parallel, then merge the most frequent pair
//! until the vocabulary is full.
//!
//! Performance notes:
//! - Counting uses the hand-written pre-tokenizer and per-thread maps keyed by borrowed
//!   `&str`, merged once per batch; only new words are copied.
//! - Words are stored once each, with their counts, as flat `u32` symbols merged in place.
//! - Pair counts are updated incrementally (each merge touches only the words that hold the
//!   pair, found through per-pair occurrence lists de-duplicated with a per-word stamp, not a
//!   HashSet). A max-heap of (count, pair) with lazy invalidation picks the next merge: counts
//!   of existing pairs only ever fall, so a popped entry whose count is stale is pushed back
//!   with its current count.
//! - Ties are broken by the smaller pair (left id, then right id), so the same input gives
//!   the same vocabulary whatever the thread count or hash order.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rayon::prelude::*;
use rustc_hash::FxHashMap;

use super::model::Bpe;
use super::pretokenize::Splitter;
use super::tokenizer::Tokenizer;
use crate::{Error, Result};

/// Texts longer than this are cut into chunks (at boundaries the pattern never crosses) so
/// both cores count one large document.
const CHUNK: usize = 1 << 20;

/// Reads a UTF-8 text file; invalid UTF-8 is a `ValueError` naming the byte offset.
pub fn read_utf8(p: &std::path::Path) -> Result<String> {
    let data = std::fs::read(p).map_err(|e| Error::io(p, e))?;
    String::from_utf8(data).map_err(|e| {
        Error::value(format!(
            "{}: not valid UTF-8 at byte {}; ferrolm reads UTF-8 text files",
            p.display(),
            e.utf8_error().valid_up_to()
        ))
    })
}

/// Counts the pre-tokenized pieces of the training data.
pub struct WordCounter {
    splitter: Splitter,
    pattern: String,
    counts: FxHashMap<Box<str>, u64>,
    bytes_seen: u64,
}

/// Cuts `text` into chunks of about `CHUNK` bytes, only right after a `\n` that follows a
/// non-space char and precedes an ASCII letter: the GPT-2 and cl100k patterns always end a
/// piece there, and the end of text changes nothing there, so counts are the same as for the
/// whole text.
fn chunks(text: &str, splittable: bool) -> Vec<&str> {
    if !splittable || text.len() <= CHUNK {
        return vec![text];
    }
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    while b.len() - start > CHUNK {
        let mut cut = None;
        let mut i = start + CHUNK;
        while i + 1 < b.len() && i < start + 4 * CHUNK {
            if b[i] == b'\n'
                && b[i + 1].is_ascii_alphabetic()
                && i > 0
                && !(b[i - 1] as char).is_ascii_whitespace()
                && b[i - 1] < 0x80
            {
                cut = Some(i + 1);
                break;
            }
            i += 1;
        }
        match cut {
            Some(c) => {
                out.push(&text[start..c]);
                start = c;
            }
            None => break,
        }
    }
    out.push(&text[start..]);
    out
}

impl WordCounter {
    /// A counter splitting with `pattern`.
    pub fn new(pattern: &str) -> Result<Self> {
        Ok(WordCounter {
            splitter: Splitter::new(pattern)?,
            pattern: pattern.to_string(),
            counts: FxHashMap::default(),
            bytes_seen: 0,
        })
    }

    /// Bytes of text counted so far.
    pub fn bytes_seen(&self) -> u64 {
        self.bytes_seen
    }

    /// Number of distinct words so far.
    pub fn num_words(&self) -> usize {
        self.counts.len()
    }

    /// Counts the words of `texts` on the current rayon pool.
    pub fn add_texts<S: AsRef<str> + Sync>(&mut self, texts: &[S]) -> Result<()> {
        let splittable = !matches!(self.splitter, Splitter::Regex(_));
        let pieces: Vec<&str> = texts.iter().flat_map(|t| chunks(t.as_ref(), splittable)).collect();
        let splitter = &self.splitter;
        let local = pieces
            .par_iter()
            .with_min_len(1)
            .try_fold(FxHashMap::<&str, u64>::default, |mut m, t| {
                splitter.split(t, |p| *m.entry(p).or_insert(0) += 1)?;
                Ok::<_, Error>(m)
            })
            .try_reduce(FxHashMap::default, |mut a, b| {
                let (mut a, b) =
                    if a.len() >= b.len() { (a, b) } else { (b, std::mem::take(&mut a)) };
                for (k, v) in b {
                    *a.entry(k).or_insert(0) += v;
                }
                Ok(a)
            })?;
        for (k, v) in local {
            match self.counts.get_mut(k) {
                Some(c) => *c += v,
                None => {
                    self.counts.insert(k.into(), v);
                }
            }
        }
        self.bytes_seen += pieces.iter().map(|p| p.len() as u64).sum::<u64>();
        Ok(())
    }

    /// Starts the merge phase.
    pub fn into_trainer(
        self,
        vocab_size: usize,
        min_frequency: u64,
        specials: Vec<String>,
    ) -> Result<Trainer> {
        Trainer::new(self, vocab_size, min_frequency, specials)
    }
}

#[inline(always)]
fn pack(a: u32, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
}

/// The merge phase of training.
pub struct Trainer {
    pattern: String,
    specials: Vec<String>,
    target_merges: usize,
    min_frequency: u64,
    /// All words' symbols, back to back; word w is `symbols[start[w]..start[w] + len[w]]`.
    symbols: Vec<u32>,
    start: Vec<u32>,
    len: Vec<u32>,
    count: Vec<u64>,
    stamp: Vec<u32>,
    pair_count: FxHashMap<u64, i64>,
    where_: FxHashMap<u64, Vec<u32>>,
    heap: BinaryHeap<(i64, Reverse<u64>)>,
    tokens: Vec<Vec<u8>>,
    merges: Vec<(u32, u32)>,
    done: bool,
}

impl Trainer {
    fn new(
        counter: WordCounter,
        vocab_size: usize,
        min_frequency: u64,
        specials: Vec<String>,
    ) -> Result<Self> {
        let reserved = 256 + specials.len();
        if vocab_size < reserved {
            return Err(Error::value(format!(
                "vocab_size={vocab_size} is too small: byte-level BPE needs 256 byte tokens \
                 plus {} special tokens; use vocab_size >= {reserved}",
                specials.len()
            )));
        }
        let mut words: Vec<(Box<str>, u64)> = counter.counts.into_iter().collect();
        // Sorted so word indices, hence everything after, do not depend on hash order.
        words.sort_unstable();
        let total: usize = words.iter().map(|(w, _)| w.len()).sum();
        let mut symbols = Vec::with_capacity(total);
        let mut start = Vec::with_capacity(words.len());
        let mut len = Vec::with_capacity(words.len());
        let mut count = Vec::with_capacity(words.len());
        for (w, c) in &words {
            start.push(symbols.len() as u32);
            len.push(w.len() as u32);
            count.push(*c);
            symbols.extend(w.bytes().map(|b| b as u32));
        }
        if symbols.len() > u32::MAX as usize {
            return Err(Error::value("training data has more than 4 GiB of distinct words"));
        }
        drop(words);
        let mut pair_count: FxHashMap<u64, i64> = FxHashMap::default();
        let mut where_: FxHashMap<u64, Vec<u32>> = FxHashMap::default();
        for w in 0..start.len() {
            let s = &symbols[start[w] as usize..(start[w] + len[w]) as usize];
            for p in s.windows(2) {
                let k = pack(p[0], p[1]);
                *pair_count.entry(k).or_insert(0) += count[w] as i64;
                let list = where_.entry(k).or_default();
                if list.last() != Some(&(w as u32)) {
                    list.push(w as u32);
                }
            }
        }
        let heap = pair_count.iter().map(|(&p, &c)| (c, Reverse(p))).collect();
        let n = start.len();
        Ok(Trainer {
            pattern: counter.pattern,
            specials,
            target_merges: vocab_size - reserved,
            min_frequency: min_frequency.max(1),
            symbols,
            start,
            len,
            count,
            stamp: vec![u32::MAX; n],
            pair_count,
            where_,
            heap,
            tokens: (0..=255u8).map(|b| vec![b]).collect(),
            merges: Vec::new(),
            done: false,
        })
    }

    /// Merges so far.
    pub fn num_merges(&self) -> usize {
        self.merges.len()
    }

    /// Merges the target vocabulary needs.
    pub fn target_merges(&self) -> usize {
        self.target_merges
    }

    /// Whether training has finished (target reached, or no pair as frequent as
    /// `min_frequency` is left).
    pub fn is_done(&self) -> bool {
        self.done || self.merges.len() >= self.target_merges
    }

    /// Performs up to `max_steps` merges; returns how many it did.
    pub fn step(&mut self, max_steps: usize) -> usize {
        let mut did = 0;
        while did < max_steps && !self.is_done() {
            if !self.merge_once() {
                self.done = true;
                break;
            }
            did += 1;
        }
        did
    }

    fn merge_once(&mut self) -> bool {
        let (best, cnt) = loop {
            let Some((c, Reverse(p))) = self.heap.pop() else { return false };
            let cur = self.pair_count.get(&p).copied().unwrap_or(0);
            if cur == c {
                break (p, c);
            }
            if cur > 0 {
                self.heap.push((cur, Reverse(p)));
            }
        };
        if (cnt as u64) < self.min_frequency || cnt <= 0 {
            return false;
        }
        let (a, b) = ((best >> 32) as u32, best as u32);
        let new = self.tokens.len() as u32;
        let mut t = self.tokens[a as usize].clone();
        t.extend_from_slice(&self.tokens[b as usize]);
        self.tokens.push(t);
        self.merges.push((a, b));
        let step = self.merges.len() as u32;

        let occ = self.where_.remove(&best).unwrap_or_default();
        let mut touched: Vec<u64> = Vec::new();
        let pc = &mut self.pair_count;
        let wh = &mut self.where_;
        for &w in &occ {
            let wi = w as usize;
            if self.stamp[wi] == step {
                continue;
            }
            self.stamp[wi] = step;
            let c = self.count[wi] as i64;
            let s0 = self.start[wi] as usize;
            let n = self.len[wi] as usize;
            let s = &mut self.symbols[s0..s0 + n];
            let (mut i, mut o) = (0, 0);
            while i < n {
                if i + 1 < n && s[i] == a && s[i + 1] == b {
                    if o > 0 {
                        let x = s[o - 1];
                        *pc.entry(pack(x, a)).or_insert(0) -= c;
                        let k = pack(x, new);
                        *pc.entry(k).or_insert(0) += c;
                        wh.entry(k).or_default().push(w);
                        touched.push(k);
                    }
                    if i + 2 < n {
                        let y = s[i + 2];
                        *pc.entry(pack(b, y)).or_insert(0) -= c;
                        let k = pack(new, y);
                        *pc.entry(k).or_insert(0) += c;
                        wh.entry(k).or_default().push(w);
                        touched.push(k);
                    }
                    s[o] = new;
                    i += 2;
                } else {
                    s[o] = s[i];
                    i += 1;
                }
                o += 1;
            }
            self.len[wi] = o as u32;
        }
        pc.remove(&best);
        touched.sort_unstable();
        touched.dedup();
        for k in touched {
            let c = pc.get(&k).copied().unwrap_or(0);
            if c > 0 {
                self.heap.push((c, Reverse(k)));
            }
        }
        true
    }

    /// The trained tokenizer: byte tokens 0..256, merges from 256 on, then special tokens.
    pub fn finish(mut self) -> Result<Tokenizer> {
        while !self.is_done() {
            self.step(usize::MAX);
        }
        let n = self.tokens.len() as u32;
        let tokens = self.tokens.into_iter().map(|t| Some(t.into_boxed_slice())).collect();
        let bpe = Bpe::from_merges(tokens, self.merges)?;
        let specials =
            self.specials.into_iter().enumerate().map(|(i, s)| (s, n + i as u32)).collect();
        Tokenizer::new(bpe, &self.pattern, specials)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpe::GPT2_PATTERN;

    /// The textbook algorithm: recount every pair after every merge.
    fn naive(words: &[(&str, u64)], merges: usize) -> Vec<(u32, u32)> {
        let mut ws: Vec<(Vec<u32>, u64)> =
            words.iter().map(|(w, c)| (w.bytes().map(|b| b as u32).collect(), *c)).collect();
        let mut out = Vec::new();
        for m in 0..merges {
            let mut counts: std::collections::BTreeMap<(u32, u32), u64> = Default::default();
            for (w, c) in &ws {
                for p in w.windows(2) {
                    *counts.entry((p[0], p[1])).or_default() += c;
                }
            }
            let Some((&best, _)) = counts.iter().max_by(|x, y| x.1.cmp(y.1).then(y.0.cmp(x.0)))
            else {
                break;
            };
            out.push(best);
            let new = 256 + m as u32;
            for (w, _) in ws.iter_mut() {
                let mut o = Vec::new();
                let mut i = 0;
                while i < w.len() {
                    if i + 1 < w.len() && (w[i], w[i + 1]) == best {
                        o.push(new);
                        i += 2;
                    } else {
                        o.push(w[i]);
                        i += 1;
                    }
                }
                *w = o;
            }
        }
        out
    }

    #[test]
    fn incremental_equals_naive() {
        let text = "the cat sat on the mat; the aaaa bbbb abab abababa aaa ba ba the hat that cat \
                    thethe sss sssss ssss mississippi missing misses";
        let mut counter = WordCounter::new(GPT2_PATTERN).unwrap();
        counter.add_texts(&[text, text, "abab the"]).unwrap();
        let mut words: Vec<(String, u64)> =
            counter.counts.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        words.sort();
        let borrowed: Vec<(&str, u64)> = words.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        let trainer = counter.into_trainer(256 + 40, 1, vec![]).unwrap();
        let tok = trainer.finish().unwrap();
        let expect = naive(&borrowed, 40);
        assert_eq!(tok.bpe.merges, expect);
    }

    #[test]
    fn chunking_keeps_counts() {
        let para = "Alpha beta, gamma!\n  delta  \nepsilon 123 zeta\n\nEta theta.\n";
        let text = para.repeat(CHUNK / para.len() * 3);
        let mut a = WordCounter::new(GPT2_PATTERN).unwrap();
        crate::parallel::install(2, || a.add_texts(&[text.as_str()])).unwrap();
        let mut b = WordCounter::new(GPT2_PATTERN).unwrap();
        let pieces = Splitter::Gpt2.pieces(&text).unwrap();
        for p in pieces {
            *b.counts.entry(p.into()).or_insert(0) += 1;
        }
        assert!(chunks(&text, true).len() > 1);
        assert_eq!(a.counts, b.counts);
    }

    #[test]
    fn too_small_vocab_is_an_error() {
        let c = WordCounter::new(GPT2_PATTERN).unwrap();
        assert!(c.into_trainer(100, 2, vec![]).is_err());
    }
}
