//! The BPE model: token bytes, the merge table, and encoding one piece.
//!
//! Performance notes (measured against tiktoken 0.14 on this 2-core Zen 3 machine; see
//! `benchmarks/bench_tokenizer.py`):
//! - Most pieces are whole tokens. The whole-piece table keys pieces of up to 15 bytes by a
//!   `u128` (bytes + length) so a lookup hashes two words and compares inline, with no pointer
//!   chase to a heap-allocated key; longer pieces use a byte-slice map.
//! - Merging works on token ids: the merge table maps a packed `(left, right)` id pair to
//!   `(rank, new id)`, so each candidate pair costs one integer hash instead of hashing a byte
//!   slice as tiktoken does.
//! - Pieces that are not whole tokens (indentation runs, rare words) go through a per-thread,
//!   direct-mapped cache of their ids (no lock, no growth, safe across fork); a profile of
//!   one-line code documents showed ~20% of the time in the merge loop before it.
//! - Pieces up to `LONG_PIECE` parts use a flat vector rescanned for the minimum (fast for
//!   short pieces). Longer ones merge over a linked list of 16-byte nodes with a bucket queue:
//!   one bucket of positions per merge rank, and a small heap of the ranks that have a bucket.
//!   A `BinaryHeap<(rank, position)>` (the previous version, as tiktoken 0.13+) spent 0.4 s of
//!   CPU on one megabyte of "x" with GPT-2's ranks, each pop walking ~20 levels of a 16 MB heap;
//!   buckets are filled left to right and drained in position order: 0.04 s, and 0.5 → 0.1 s
//!   on a megabyte of random letters (`benchmarks/bench_tokenizer.py`, worst-case rows).
//! - Vocabularies that lack some single bytes (SmolLM2's) take a slower start only for the pieces
//!   that hold such a byte; a complete vocabulary never checks.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU64, Ordering};

use rustc_hash::FxHashMap;

use crate::{Error, Result};

const NONE: u64 = u64::MAX;
/// `byte_ids` entry of a byte the vocabulary has no token for.
const MISSING: u32 = u32::MAX;
/// Pieces of more parts than this merge with [`Bpe::merge_long`].
const LONG_PIECE: usize = 128;

/// Which adjacent pairs merge, and in what order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeRule {
    /// tiktoken: any two adjacent parts whose concatenated bytes form a token merge, lowest rank
    /// (= token id) first; a piece that is a whole token is that token.
    Ranks,
    /// HF tokenizers: only the pairs of the merge list merge, earliest merge first.
    Merges,
}

/// Maps token bytes to ids: short keys inline, long keys by slice.
#[derive(Debug, Clone, Default)]
pub(crate) struct PieceMap {
    short: FxHashMap<u128, u32>,
    long: FxHashMap<Box<[u8]>, u32>,
}

#[inline(always)]
fn short_key(b: &[u8]) -> Option<u128> {
    if b.len() > 15 {
        return None;
    }
    let mut buf = [0u8; 16];
    buf[..b.len()].copy_from_slice(b);
    buf[15] = b.len() as u8;
    Some(u128::from_le_bytes(buf))
}

impl PieceMap {
    pub(crate) fn insert(&mut self, b: &[u8], id: u32) -> Option<u32> {
        match short_key(b) {
            Some(k) => self.short.insert(k, id),
            None => self.long.insert(b.into(), id),
        }
    }
    #[inline(always)]
    pub(crate) fn get(&self, b: &[u8]) -> Option<u32> {
        self.get_keyed(b, short_key(b))
    }
    #[inline(always)]
    fn get_keyed(&self, b: &[u8], key: Option<u128>) -> Option<u32> {
        match key {
            Some(k) => self.short.get(&k).copied(),
            None => self.long.get(b).copied(),
        }
    }
    pub(crate) fn len(&self) -> usize {
        self.short.len() + self.long.len()
    }
}

/// A byte-level BPE model: the mergeable tokens (no special tokens) and how they merge.
#[derive(Debug, Clone)]
pub struct Bpe {
    /// Token bytes by id; `None` for ids that are not mergeable tokens (special tokens, gaps).
    pub(crate) tokens: Vec<Option<Box<[u8]>>>,
    /// Every token's bytes to its id.
    pub(crate) by_bytes: PieceMap,
    /// Pieces that encode to exactly one token (the whole-piece shortcut).
    whole: PieceMap,
    byte_ids: [u32; 256],
    /// Packed (left, right) → packed (rank, new id).
    pairs: FxHashMap<u64, u64>,
    /// The merge list in rank order (for `MergeRule::Merges`; derived for `Ranks` on export).
    pub(crate) merges: Vec<(u32, u32)>,
    pub(crate) rule: MergeRule,
    /// Whether every single byte is a token (else `byte_ids` holds `MISSING` entries).
    complete: bool,
    /// What a byte without a token becomes, as in HF's BPE without byte fallback: this id when
    /// set, else nothing (the byte is dropped before merging).
    pub(crate) unk: Option<u32>,
    /// HF `fuse_unk`: a run of such bytes becomes one `unk`.
    pub(crate) fuse_unk: bool,
    /// HF `ignore_merges`: a piece that is a whole token is that token, reachable or not.
    pub(crate) ignore_merges: bool,
    /// Whether different merges may share a rank ([`Bpe::with_merge_ranks`]); the short-piece
    /// loop then compares ranks alone (a separate instance, so the usual one is unchanged).
    tied_ranks: bool,
    /// Identifies this model in the per-thread piece caches.
    uid: u64,
}

static NEXT_UID: AtomicU64 = AtomicU64::new(1);

const CACHE_SLOTS: usize = 4096;
const CACHE_IDS: usize = 7;

#[derive(Clone, Copy, Default)]
struct Slot {
    key: u128,
    n: u8,
    ids: [u32; CACHE_IDS],
}

#[inline(always)]
fn pack(a: u32, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
}

/// How [`Bpe::encode_word`] starts a word (HF's char-level BPE options).
#[derive(Debug, Clone, Default)]
pub struct WordOpts {
    /// `continuing_subword_prefix`: put before every char but the first.
    pub prefix: Option<String>,
    /// `end_of_word_suffix`: put after the last char.
    pub suffix: Option<String>,
    /// `byte_fallback`: the id of each `<0xXX>` token (`u32::MAX` where there is none).
    pub byte_fallback: Option<Box<[u32; 256]>>,
}

/// Reusable buffers for encoding, and the piece cache; one per thread (see [`with_scratch`]).
#[derive(Default)]
pub struct Scratch {
    word: Vec<u32>,
    parts: Vec<(u32, u64)>,
    nodes: Vec<Node>,
    queue: RankQueue,
    cache_owner: u64,
    cache: Vec<Slot>,
}

/// One part of a long piece: a doubly linked list over the part positions (16 bytes, so that a
/// megabyte's nodes stay in the last-level cache).
#[derive(Clone, Copy)]
struct Node {
    /// The part's token id; `END` once merged into the part on its left.
    id: u32,
    prev: u32,
    next: u32,
    /// The merge rank of this part and the next one, or `END`.
    rank: u32,
}

/// End of the linked list, and the id of a merged-away node.
const END: u32 = u32::MAX;

/// A priority queue of `(rank, position)` for [`Bpe::merge_long`]: one bucket of positions per
/// rank (`slot` maps a rank to its bucket in `pool`) and a heap of the ranks that have a bucket.
/// Buckets are taken whole and drained in position order, which is the heap's order.
#[derive(Default)]
struct RankQueue {
    /// Rank → index into `pool`, or `END`; every entry is `END` between pieces.
    slot: Vec<u32>,
    pool: Vec<Vec<u32>>,
    free: Vec<u32>,
    ranks: BinaryHeap<Reverse<u32>>,
    /// The bucket being drained (kept for its allocation).
    batch: Vec<u32>,
    /// Set when a rank at or below `current` is pushed (the bucket being drained must yield).
    low: bool,
    current: u32,
}

impl RankQueue {
    /// Prepares for ranks below `bound`.
    fn reset(&mut self, bound: usize) {
        if self.slot.len() < bound {
            self.slot.resize(bound, END);
        }
        self.ranks.clear();
        self.current = u32::MAX;
        self.low = false;
    }

    #[inline(always)]
    fn push(&mut self, rank: u32, pos: u32) {
        let r = rank as usize;
        let mut at = self.slot[r];
        if at == END {
            at = match self.free.pop() {
                Some(i) => i,
                None => {
                    self.pool.push(Vec::new());
                    (self.pool.len() - 1) as u32
                }
            };
            self.slot[r] = at;
            self.ranks.push(Reverse(rank));
        }
        self.pool[at as usize].push(pos);
        self.low |= rank <= self.current;
    }

    /// Moves the lowest rank's positions into `batch` (sorted), or returns `None` when empty.
    fn pop_bucket(&mut self, batch: &mut Vec<u32>) -> Option<u32> {
        let Reverse(rank) = self.ranks.pop()?;
        let at = std::mem::replace(&mut self.slot[rank as usize], END);
        batch.clear();
        std::mem::swap(batch, &mut self.pool[at as usize]);
        self.free.push(at);
        // Filled left to right, except for left neighbours: sorted or nearly so.
        batch.sort_unstable();
        self.current = rank;
        self.low = false;
        Some(rank)
    }
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Runs `f` with this thread's scratch buffers (a fresh set if they are already in use).
pub fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut s) => f(&mut s),
        Err(_) => f(&mut Scratch::default()),
    })
}

impl Bpe {
    fn empty(tokens: Vec<Option<Box<[u8]>>>, rule: MergeRule, all_bytes: bool) -> Result<Self> {
        let mut by_bytes = PieceMap::default();
        for (id, t) in tokens.iter().enumerate() {
            if let Some(t) = t {
                if t.is_empty() {
                    return Err(Error::format(format!("token id {id} has empty bytes")));
                }
                if let Some(prev) = by_bytes.insert(t, id as u32) {
                    return Err(Error::format(format!(
                        "token bytes {:?} appear twice (ids {prev} and {id}); each token must \
                         be unique",
                        String::from_utf8_lossy(t)
                    )));
                }
            }
        }
        let mut byte_ids = [MISSING; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            match by_bytes.get(&[b as u8]) {
                Some(id) => *slot = id,
                None if all_bytes => {
                    return Err(Error::format(format!(
                        "the vocabulary has no token for the single byte 0x{b:02x}; a \
                         tiktoken-style vocabulary needs all 256"
                    )))
                }
                None => {}
            }
        }
        let complete = !byte_ids.contains(&MISSING);
        Ok(Bpe {
            tokens,
            by_bytes,
            whole: PieceMap::default(),
            byte_ids,
            pairs: FxHashMap::default(),
            merges: Vec::new(),
            rule,
            complete,
            unk: None,
            fuse_unk: false,
            ignore_merges: false,
            tied_ranks: false,
            uid: NEXT_UID.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// A tiktoken-style model from `(bytes, rank)` pairs: the rank is the token id.
    pub fn from_ranks(ranks: Vec<(Vec<u8>, u32)>) -> Result<Self> {
        let n = ranks.iter().map(|(_, r)| *r as usize + 1).max().unwrap_or(0);
        let mut tokens: Vec<Option<Box<[u8]>>> = vec![None; n];
        for (b, r) in ranks {
            if tokens[r as usize].is_some() {
                return Err(Error::format(format!("rank {r} appears twice")));
            }
            tokens[r as usize] = Some(b.into_boxed_slice());
        }
        let mut bpe = Self::empty(tokens, MergeRule::Ranks, true)?;
        // Every split of a token into two tokens is a pair that merges into it.
        let mut pairs = FxHashMap::default();
        for (id, t) in bpe.tokens.iter().enumerate() {
            let Some(t) = t else { continue };
            for k in 1..t.len() {
                if let (Some(l), Some(r)) = (bpe.by_bytes.get(&t[..k]), bpe.by_bytes.get(&t[k..])) {
                    pairs.insert(pack(l, r), pack(id as u32, id as u32));
                }
            }
        }
        bpe.pairs = pairs;
        // tiktoken looks every piece up whole first, so every token is a shortcut.
        bpe.whole = bpe.by_bytes.clone();
        Ok(bpe)
    }

    /// An HF-style model from tokens by id and a merge list of id pairs (rank = position).
    /// Single bytes without a token are dropped before merging, as HF does when no `unk` is set
    /// (see [`Bpe::with_unknown`]).
    pub fn from_merges(tokens: Vec<Option<Box<[u8]>>>, merges: Vec<(u32, u32)>) -> Result<Self> {
        Self::from_merges_with(tokens, merges, None, true)
    }

    /// As [`Bpe::from_merges`], for HF's char-level models ([`Bpe::encode_word`]): the right
    /// part of a merge loses its `continuing_subword_prefix` (HF names `a + b` minus the
    /// prefix), and `whole` says whether to build the byte-level whole-piece shortcut.
    pub fn from_merges_with(
        tokens: Vec<Option<Box<[u8]>>>,
        merges: Vec<(u32, u32)>,
        prefix: Option<&[u8]>,
        whole_pieces: bool,
    ) -> Result<Self> {
        let mut bpe = Self::empty(tokens, MergeRule::Merges, false)?;
        let mut pairs = FxHashMap::default();
        let mut concat = Vec::new();
        for (rank, &(a, b)) in merges.iter().enumerate() {
            concat.clear();
            for x in [a, b] {
                let mut t = bpe.token_bytes(x).ok_or_else(|| {
                    Error::format(format!("merge {rank} refers to id {x}, which is not a token"))
                })?;
                if let (Some(p), true) = (prefix, x == b) {
                    t = t.strip_prefix(p).unwrap_or(t);
                }
                concat.extend_from_slice(t);
            }
            let new = bpe.by_bytes.get(&concat).ok_or_else(|| {
                Error::format(format!(
                    "merge {rank} ({a}, {b}) makes {:?}, which is not in the vocabulary",
                    String::from_utf8_lossy(&concat)
                ))
            })?;
            // As in HF tokenizers, a repeated pair keeps its last rank.
            pairs.insert(pack(a, b), pack(rank as u32, new));
        }
        bpe.pairs = pairs;
        bpe.merges = merges;
        if !whole_pieces {
            return Ok(bpe);
        }
        bpe.whole = bpe.reachable_tokens();
        Ok(bpe)
    }

    /// The whole-piece table of a `Merges` model: a token is a shortcut only if BPE reaches it
    /// from its own bytes; others (rare, unreachable tokens) go through the merge loop so the
    /// ids stay HF's.
    fn reachable_tokens(&self) -> PieceMap {
        let mut whole = PieceMap::default();
        let mut scratch = Scratch::default();
        let mut out = Vec::new();
        for (id, t) in self.tokens.iter().enumerate() {
            let Some(t) = t else { continue };
            out.clear();
            self.merge_piece(t, u64::MAX, &mut scratch, &mut out);
            if out.len() == 1 && out[0] == id as u32 {
                whole.insert(t, id as u32);
            }
        }
        whole
    }

    /// The same merges with merge `i` given rank `ranks[i]` instead of `i`: merges that share a
    /// rank compete by position, leftmost first. llama.cpp's SentencePiece tokenizer ranks a
    /// pair by its token's score, so tokens of equal score share a rank.
    ///
    /// Errors: a `Ranks` model, or `ranks` not one entry per merge.
    pub fn with_merge_ranks(mut self, ranks: &[u32]) -> Result<Self> {
        if self.rule != MergeRule::Merges || ranks.len() != self.merges.len() {
            return Err(Error::value(format!(
                "with_merge_ranks needs a merge-list model and one rank per merge ({} merges, {} \
                 ranks given)",
                self.merges.len(),
                ranks.len()
            )));
        }
        let mut pairs = FxHashMap::default();
        for (&(a, b), &rank) in self.merges.iter().zip(ranks) {
            if let Some(&v) = self.pairs.get(&pack(a, b)) {
                // As in `from_merges_with`, a repeated pair keeps its last rank.
                pairs.insert(pack(a, b), pack(rank, v as u32));
            }
        }
        self.pairs = pairs;
        self.tied_ranks = true;
        if !self.ignore_merges && self.whole.len() > 0 {
            self.whole = self.reachable_tokens();
        }
        self.uid = NEXT_UID.fetch_add(1, Ordering::Relaxed);
        Ok(self)
    }

    /// Bytes without a token become `unk` (one per byte, or one per run with `fuse`) instead of
    /// being dropped: HF's `unk_token` and `fuse_unk`.
    pub fn with_unknown(mut self, unk: Option<u32>, fuse: bool) -> Self {
        self.unk = unk;
        self.fuse_unk = fuse;
        self.uid = NEXT_UID.fetch_add(1, Ordering::Relaxed);
        self
    }

    /// HF's and llama.cpp's `ignore_merges`: a piece that is a whole token is that token, even
    /// one the merges never reach.
    pub fn with_ignore_merges(mut self) -> Self {
        self.whole = self.by_bytes.clone();
        self.ignore_merges = true;
        self.uid = NEXT_UID.fetch_add(1, Ordering::Relaxed);
        self
    }

    /// Whether every single byte has a token.
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// The bytes of token `id`, if it is a mergeable token.
    #[inline]
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.tokens.get(id as usize).and_then(|t| t.as_deref())
    }

    /// The id of the token with exactly these bytes.
    pub fn token_id(&self, b: &[u8]) -> Option<u32> {
        self.by_bytes.get(b)
    }

    /// Number of mergeable tokens.
    pub fn len(&self) -> usize {
        self.by_bytes.len()
    }

    /// Whether the model has no tokens (never true for a valid model).
    pub fn is_empty(&self) -> bool {
        self.by_bytes.len() == 0
    }

    /// One past the largest mergeable id.
    pub fn id_bound(&self) -> usize {
        self.tokens.len()
    }

    #[inline(always)]
    fn pair(&self, a: u32, b: u32, max_rank: u64) -> u64 {
        match self.pairs.get(&pack(a, b)) {
            Some(&v) if (v >> 32) < max_rank => v,
            _ => NONE,
        }
    }

    /// Appends the ids of one pre-tokenized piece to `out`.
    #[inline]
    pub fn encode_piece(&self, piece: &[u8], scratch: &mut Scratch, out: &mut Vec<u32>) {
        let key = short_key(piece);
        if let Some(id) = self.whole.get_keyed(piece, key) {
            out.push(id);
            return;
        }
        let Some(key) = key else {
            self.merge_piece(piece, u64::MAX, scratch, out);
            return;
        };
        self.cached(key, scratch, out, |s, o| self.merge_piece(piece, u64::MAX, s, o));
    }

    /// Appends the cached ids of the piece with short key `key`, or runs `encode` and caches
    /// what it appends (the per-thread, direct-mapped piece cache).
    #[inline]
    fn cached(
        &self,
        key: u128,
        scratch: &mut Scratch,
        out: &mut Vec<u32>,
        encode: impl FnOnce(&mut Scratch, &mut Vec<u32>),
    ) {
        if scratch.cache_owner != self.uid {
            scratch.cache.clear();
            scratch.cache.resize(CACHE_SLOTS, Slot::default());
            scratch.cache_owner = self.uid;
        }
        let h = ((key as u64) ^ ((key >> 64) as u64).rotate_left(29))
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let slot = (h >> 52) as usize & (CACHE_SLOTS - 1);
        let e = scratch.cache[slot];
        if e.key == key {
            out.extend_from_slice(&e.ids[..e.n as usize]);
            return;
        }
        let start = out.len();
        encode(scratch, out);
        let ids = &out[start..];
        if ids.len() <= CACHE_IDS {
            let mut e = Slot { key, n: ids.len() as u8, ids: [0; CACHE_IDS] };
            e.ids[..ids.len()].copy_from_slice(ids);
            scratch.cache[slot] = e;
        }
    }

    /// Runs the merge loop on `piece`, using only merges of rank below `max_rank`.
    fn merge_piece(&self, piece: &[u8], max_rank: u64, scratch: &mut Scratch, out: &mut Vec<u32>) {
        if !self.complete && piece.iter().any(|&b| self.byte_ids[b as usize] == MISSING) {
            return self.merge_incomplete(piece, max_rank, scratch, out);
        }
        let ids = piece.iter().map(|&b| self.byte_ids[b as usize]);
        match piece.len() {
            0 => {}
            1 => out.push(self.byte_ids[piece[0] as usize]),
            n if n <= LONG_PIECE => self.merge_short(ids, max_rank, scratch, out),
            _ => self.merge_long(ids, max_rank, scratch, out),
        }
    }

    /// A piece holding bytes without a token: they become `unk` or vanish (HF's `merge_word`),
    /// then the rest merges as usual.
    fn merge_incomplete(
        &self,
        piece: &[u8],
        max_rank: u64,
        scratch: &mut Scratch,
        out: &mut Vec<u32>,
    ) {
        let mut ids = Vec::with_capacity(piece.len());
        let mut after_unk = false;
        for &b in piece {
            let id = self.byte_ids[b as usize];
            if id != MISSING {
                ids.push(id);
                after_unk = false;
            } else if let Some(unk) = self.unk {
                if !(self.fuse_unk && after_unk) {
                    ids.push(unk);
                }
                after_unk = true;
            }
        }
        match ids.len() {
            0 | 1 => out.extend_from_slice(&ids),
            n if n <= LONG_PIECE => self.merge_short(ids.iter().copied(), max_rank, scratch, out),
            _ => self.merge_long(ids.iter().copied(), max_rank, scratch, out),
        }
    }

    /// Appends the ids of one pre-tokenized word the way HF's char-level BPE does
    /// (`BPE::merge_word`): each char is looked up as a token (with the continuing-subword
    /// prefix after the first char and the end-of-word suffix on the last), a char without a
    /// token becomes its `<0x..>` byte tokens (byte fallback) or `unk`, then the merges run.
    pub fn encode_word(&self, w: &str, opts: &WordOpts, scratch: &mut Scratch, out: &mut Vec<u32>) {
        match short_key(w.as_bytes()) {
            // The cache belongs to this model (its uid), and `opts` are fixed per model.
            Some(key) if !w.is_empty() => {
                self.cached(key, scratch, out, |s, o| self.encode_word_uncached(w, opts, s, o))
            }
            _ => self.encode_word_uncached(w, opts, scratch, out),
        }
    }

    fn encode_word_uncached(
        &self,
        w: &str,
        opts: &WordOpts,
        scratch: &mut Scratch,
        out: &mut Vec<u32>,
    ) {
        if w.is_empty() {
            return;
        }
        if self.ignore_merges {
            if let Some(id) = self.by_bytes.get(w.as_bytes()) {
                out.push(id);
                return;
            }
        }
        let mut ids = std::mem::take(&mut scratch.word);
        ids.clear();
        let mut pending_unk: Option<u32> = None;
        let mut buf = String::new();
        let mut chars = w.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            let end = chars.peek().map_or(w.len(), |&(j, _)| j);
            let first = i == 0;
            let last = end == w.len();
            let s: &str = if (first || opts.prefix.is_none()) && (!last || opts.suffix.is_none()) {
                &w[i..end]
            } else {
                buf.clear();
                if let (false, Some(p)) = (first, &opts.prefix) {
                    buf.push_str(p);
                }
                buf.push(c);
                if let (true, Some(x)) = (last, &opts.suffix) {
                    buf.push_str(x);
                }
                &buf
            };
            if let Some(id) = self.by_bytes.get(s.as_bytes()) {
                if let Some(u) = pending_unk.take() {
                    ids.push(u);
                }
                ids.push(id);
                continue;
            }
            if let Some(table) = &opts.byte_fallback {
                if s.bytes().all(|b| table[b as usize] != MISSING) {
                    // HF leaves a pending unk where it is: it is pushed after these bytes.
                    ids.extend(s.bytes().map(|b| table[b as usize]));
                    continue;
                }
            }
            if let Some(u) = self.unk {
                match pending_unk {
                    Some(_) if self.fuse_unk => {}
                    Some(p) => {
                        ids.push(p);
                        pending_unk = Some(u);
                    }
                    None => pending_unk = Some(u),
                }
            }
        }
        if let Some(u) = pending_unk {
            ids.push(u);
        }
        match ids.len() {
            0 | 1 => out.extend_from_slice(&ids),
            n if n <= LONG_PIECE => self.merge_short(ids.iter().copied(), u64::MAX, scratch, out),
            _ => self.merge_long(ids.iter().copied(), u64::MAX, scratch, out),
        }
        scratch.word = ids;
    }

    /// Merges the parts `ids` (at least two) with the short-piece loop.
    #[inline(always)]
    fn merge_short(
        &self,
        ids: impl Iterator<Item = u32>,
        max_rank: u64,
        scratch: &mut Scratch,
        out: &mut Vec<u32>,
    ) {
        if self.tied_ranks {
            self.merge_small::<true>(ids, max_rank, scratch, out)
        } else {
            self.merge_small::<false>(ids, max_rank, scratch, out)
        }
    }

    /// Merges the parts `ids` (at least two); `TIED`: merges may share a rank.
    fn merge_small<const TIED: bool>(
        &self,
        ids: impl Iterator<Item = u32>,
        max_rank: u64,
        scratch: &mut Scratch,
        out: &mut Vec<u32>,
    ) {
        let parts = &mut scratch.parts;
        parts.clear();
        parts.extend(ids.map(|id| (id, NONE)));
        for i in 0..parts.len().saturating_sub(1) {
            parts[i].1 = self.pair(parts[i].0, parts[i + 1].0, max_rank);
        }
        loop {
            // Leftmost lowest rank: ties go to the earliest pair, as in tiktoken, HF and
            // llama.cpp. Untied ranks compare whole values (one rank, one new id); comparing
            // the rank half costs ~5% on cl100k's long documents, so only tied models do.
            let mut best = NONE;
            let mut at = 0;
            for (i, p) in parts.iter().enumerate() {
                let better = if TIED { p.1 >> 32 < best >> 32 } else { p.1 < best };
                if better {
                    best = p.1;
                    at = i;
                }
            }
            if best == NONE {
                break;
            }
            parts[at].0 = best as u32;
            parts.remove(at + 1);
            parts[at].1 = match parts.get(at + 1) {
                Some(next) => self.pair(best as u32, next.0, max_rank),
                None => NONE,
            };
            if at > 0 {
                parts[at - 1].1 = self.pair(parts[at - 1].0, best as u32, max_rank);
            }
        }
        out.extend(parts.iter().map(|p| p.0));
    }

    /// Merges the parts `ids` (at least two) in O(n log n): the same merges, in the same order,
    /// as [`Bpe::merge_small`] (lowest rank first, leftmost first among equal ranks).
    fn merge_long(
        &self,
        ids: impl Iterator<Item = u32>,
        max_rank: u64,
        scratch: &mut Scratch,
        out: &mut Vec<u32>,
    ) {
        let Scratch { nodes, queue, .. } = scratch;
        nodes.clear();
        for (i, id) in ids.enumerate() {
            let i = i as u32;
            nodes.push(Node { id, prev: i.wrapping_sub(1), next: i + 1, rank: END });
        }
        let Some(last) = nodes.last_mut() else { return };
        last.next = END;
        nodes[0].prev = END;
        // Ranks are token ids (`Ranks`) or merge positions (`Merges`).
        queue.reset(self.tokens.len().max(self.merges.len()));
        let rank_of = |v: u64| if v == NONE { END } else { (v >> 32) as u32 };
        for i in 0..nodes.len() - 1 {
            let r = rank_of(self.pair(nodes[i].id, nodes[i + 1].id, max_rank));
            nodes[i].rank = r;
            if r != END {
                queue.push(r, i as u32);
            }
        }
        let mut batch = std::mem::take(&mut queue.batch);
        while let Some(rank) = queue.pop_bucket(&mut batch) {
            for (k, &pos) in batch.iter().enumerate() {
                let node = nodes[pos as usize];
                // Stale: merged away, or its pair changed since it was queued.
                if node.id == END || node.rank != rank {
                    continue;
                }
                let next = nodes[node.next as usize];
                // `Ranks`: the new token's id is its rank; `Merges`: the merge says which token.
                let new = match self.rule {
                    MergeRule::Ranks => rank,
                    MergeRule::Merges => self.pair(node.id, next.id, max_rank) as u32,
                };
                nodes[node.next as usize].id = END;
                let after = next.next;
                let mut r = END;
                if after != END {
                    nodes[after as usize].prev = pos;
                    r = rank_of(self.pair(new, nodes[after as usize].id, max_rank));
                }
                nodes[pos as usize] = Node { id: new, prev: node.prev, next: after, rank: r };
                if r != END {
                    queue.push(r, pos);
                }
                if node.prev != END {
                    let p = node.prev as usize;
                    let r = rank_of(self.pair(nodes[p].id, new, max_rank));
                    nodes[p].rank = r;
                    if r != END {
                        queue.push(r, node.prev);
                    }
                }
                if queue.low {
                    // A pair of this rank or lower appeared: requeue the rest and start over.
                    for &p in &batch[k + 1..] {
                        queue.push(rank, p);
                    }
                    break;
                }
            }
        }
        queue.batch = batch;
        let mut i = 0u32;
        while i != END {
            out.push(nodes[i as usize].id);
            i = nodes[i as usize].next;
        }
    }

    /// The merge list: stored for HF-style models; for tiktoken-style models, each token's
    /// merge is found by running BPE on its bytes with the lower ranks only (a token whose
    /// bytes do not end as exactly two parts has no merge and is left out).
    pub fn merge_list(&self) -> Vec<(u32, u32)> {
        if self.rule == MergeRule::Merges {
            return self.merges.clone();
        }
        let mut scratch = Scratch::default();
        let mut out = Vec::new();
        let mut merges = Vec::new();
        for (id, t) in self.tokens.iter().enumerate() {
            let Some(t) = t else { continue };
            if t.len() < 2 {
                continue;
            }
            out.clear();
            self.merge_piece(t, id as u64, &mut scratch, &mut out);
            if let [a, b] = out[..] {
                merges.push((a, b));
            }
        }
        merges
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn byte_tokens() -> Vec<(Vec<u8>, u32)> {
        (0..=255u8).map(|b| (vec![b], b as u32)).collect()
    }

    #[test]
    fn ranks_merge_lowest_first() {
        let mut r = byte_tokens();
        r.push((b"ab".to_vec(), 256));
        r.push((b"bc".to_vec(), 257));
        r.push((b"abc".to_vec(), 258));
        let bpe = Bpe::from_ranks(r).unwrap();
        let mut s = Scratch::default();
        let mut out = Vec::new();
        bpe.encode_piece(b"abcab", &mut s, &mut out);
        assert_eq!(out, vec![258, 256]);
    }

    #[test]
    fn small_and_long_paths_agree() {
        let mut r = byte_tokens();
        let words: [&[u8]; 6] = [b"xx", b"xxxx", b"xy", b"xxy", b"yx", b"xxxxxxxx"];
        for (i, w) in words.iter().enumerate() {
            r.push((w.to_vec(), 256 + i as u32));
        }
        let bpe = Bpe::from_ranks(r).unwrap();
        let mut s = Scratch::default();
        let mut lcg = 7u64;
        for len in [2usize, 5, 17, 129, 300, 1000] {
            let piece: Vec<u8> = (0..len)
                .map(|_| {
                    lcg = lcg.wrapping_mul(6364136223846793005).wrapping_add(1);
                    if (lcg >> 40).is_multiple_of(3) {
                        b'y'
                    } else {
                        b'x'
                    }
                })
                .collect();
            let (mut a, mut b) = (Vec::new(), Vec::new());
            let ids = || piece.iter().map(|&b| bpe.byte_ids[b as usize]);
            bpe.merge_small::<false>(ids(), NONE, &mut s, &mut a);
            bpe.merge_long(ids(), NONE, &mut s, &mut b);
            assert_eq!(a, b, "len {len}");
            let back: Vec<u8> =
                a.iter().flat_map(|&i| bpe.token_bytes(i).unwrap().to_vec()).collect();
            assert_eq!(back, piece);
        }
    }

    struct Lcg(u64);
    impl Lcg {
        fn below(&mut self, n: usize) -> usize {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((self.0 >> 33) % n as u64) as usize
        }
    }

    fn assert_paths_agree(bpe: &Bpe, rng: &mut Lcg, alphabet: &[u8], what: &str) {
        let mut s = Scratch::default();
        for len in [2usize, 7, 129, 400, 2000] {
            let piece: Vec<u8> = (0..len).map(|_| alphabet[rng.below(alphabet.len())]).collect();
            let (mut a, mut b) = (Vec::new(), Vec::new());
            let ids = || piece.iter().map(|&b| bpe.byte_ids[b as usize]);
            bpe.merge_small::<false>(ids(), NONE, &mut s, &mut a);
            bpe.merge_long(ids(), NONE, &mut s, &mut b);
            assert_eq!(a, b, "{what}, len {len}");
        }
    }

    /// Random vocabularies whose ranks are not in merge order (a merge's result can rank below
    /// the pairs that build it), so the bucket queue must go back to lower ranks.
    #[test]
    fn long_path_matches_small_path_on_shuffled_ranks() {
        let mut rng = Lcg(11);
        for round in 0..40 {
            let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
            let alphabet: &[u8] = if round % 2 == 0 { b"ab" } else { b"abcd" };
            let mut usable: Vec<usize> = alphabet.iter().map(|&b| b as usize).collect();
            for _ in 0..60 {
                let (l, r) = (usable[rng.below(usable.len())], usable[rng.below(usable.len())]);
                let t = [&tokens[l][..], &tokens[r][..]].concat();
                if t.len() <= 8 && !tokens.contains(&t) {
                    tokens.push(t);
                    usable.push(tokens.len() - 1);
                }
            }
            // Ranks: the single bytes first, the rest shuffled.
            let mut order: Vec<usize> = (256..tokens.len()).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i + 1));
            }
            let mut ranks: Vec<(Vec<u8>, u32)> =
                (0..256).map(|b| (tokens[b].clone(), b as u32)).collect();
            for (k, &i) in order.iter().enumerate() {
                ranks.push((tokens[i].clone(), 256 + k as u32));
            }
            let bpe = Bpe::from_ranks(ranks).unwrap();
            assert_paths_agree(&bpe, &mut rng, alphabet, &format!("ranks round {round}"));

            // The same tokens as an HF merge list in a shuffled order.
            let mut by_bytes: FxHashMap<Vec<u8>, u32> = FxHashMap::default();
            for (i, t) in tokens.iter().enumerate() {
                by_bytes.insert(t.clone(), i as u32);
            }
            let mut merges = Vec::new();
            for &i in &order {
                let t = &tokens[i];
                let k = 1 + rng.below(t.len() - 1);
                if let (Some(&a), Some(&b)) = (by_bytes.get(&t[..k]), by_bytes.get(&t[k..])) {
                    merges.push((a, b));
                }
            }
            let toks = tokens.iter().map(|t| Some(t.clone().into_boxed_slice())).collect();
            let bpe = Bpe::from_merges(toks, merges).unwrap();
            assert_paths_agree(&bpe, &mut rng, alphabet, &format!("merges round {round}"));
        }
    }

    /// A merge whose result pairs with the next part at the same rank (possible with a
    /// continuing-subword prefix: "##" + "##x" makes "##x").
    #[test]
    fn long_path_handles_a_merge_that_repeats_its_own_rank() {
        let mut tokens: Vec<Option<Box<[u8]>>> =
            (0..=255u8).map(|b| Some(vec![b].into_boxed_slice())).collect();
        for t in [&b"##"[..], b"##x"] {
            tokens.push(Some(t.to_vec().into_boxed_slice()));
        }
        // 256 = "##", 257 = "##x"; "#" + "#" -> "##", then "##" + "##x" -> "##x".
        let merges = vec![(b'#' as u32, b'#' as u32), (256, 257), (256, b'x' as u32)];
        let bpe = Bpe::from_merges_with(tokens, merges, Some(b"##"), false).unwrap();
        let mut rng = Lcg(5);
        assert_paths_agree(&bpe, &mut rng, b"#x", "prefix");
    }

    #[test]
    fn long_run_is_fast_and_exact() {
        let mut r = byte_tokens();
        let mut t = b"x".to_vec();
        for i in 0..6 {
            t.extend_from_within(..);
            r.push((t.clone(), 256 + i));
        }
        let bpe = Bpe::from_ranks(r).unwrap();
        let piece = vec![b'x'; 1_000_000];
        let mut out = Vec::new();
        bpe.encode_piece(&piece, &mut Scratch::default(), &mut out);
        assert_eq!(out.len(), 1_000_000 / 64);
    }

    #[test]
    fn missing_bytes_drop_or_become_unk() {
        // Byte 0x04 has no token; "a" + "b" merge once the byte between them is gone (HF).
        let mut tokens: Vec<Option<Box<[u8]>>> =
            (0..=255u8).map(|b| (b != 4).then(|| vec![b].into_boxed_slice())).collect();
        tokens.push(Some(b"ab".to_vec().into_boxed_slice()));
        let merges = vec![(b'a' as u32, b'b' as u32)];
        let bpe = Bpe::from_merges(tokens.clone(), merges.clone()).unwrap();
        assert!(!bpe.is_complete());
        let mut s = Scratch::default();
        let mut out = Vec::new();
        bpe.encode_piece(b"a\x04b\x04", &mut s, &mut out);
        assert_eq!(out, vec![256]);
        let with_unk = Bpe::from_merges(tokens.clone(), merges.clone()).unwrap();
        let with_unk = with_unk.with_unknown(Some(300), false);
        out.clear();
        with_unk.encode_piece(b"a\x04\x04b", &mut s, &mut out);
        assert_eq!(out, vec![97, 300, 300, 98]);
        let fused = Bpe::from_merges(tokens, merges).unwrap().with_unknown(Some(300), true);
        out.clear();
        fused.encode_piece(b"a\x04\x04b", &mut s, &mut out);
        assert_eq!(out, vec![97, 300, 98]);
        out.clear();
        bpe.encode_piece(&[4; 200], &mut s, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn tied_merge_ranks_go_leftmost() {
        let mut tokens: Vec<Option<Box<[u8]>>> =
            (0..=255u8).map(|b| Some(vec![b].into_boxed_slice())).collect();
        tokens.push(Some(b"bc".to_vec().into_boxed_slice())); // 256
        tokens.push(Some(b"ab".to_vec().into_boxed_slice())); // 257
        let merges = vec![(b'b' as u32, b'c' as u32), (b'a' as u32, b'b' as u32)];
        let bpe = Bpe::from_merges(tokens, merges).unwrap();
        let tied = bpe.clone().with_merge_ranks(&[0, 0]).unwrap();
        let mut s = Scratch::default();
        for n in [1usize, 100] {
            let piece = b"abc".repeat(n);
            let (mut a, mut b) = (Vec::new(), Vec::new());
            bpe.encode_piece(&piece, &mut s, &mut a);
            tied.encode_piece(&piece, &mut s, &mut b);
            assert_eq!(a, [b'a' as u32, 256].repeat(n), "by rank: bc first");
            assert_eq!(b, [257, b'c' as u32].repeat(n), "tied: the leftmost pair first");
        }
        assert!(bpe.with_merge_ranks(&[0]).is_err());
    }

    #[test]
    fn missing_byte_is_format_error() {
        let r: Vec<(Vec<u8>, u32)> = (0..=254u8).map(|b| (vec![b], b as u32)).collect();
        let e = Bpe::from_ranks(r).unwrap_err().to_string();
        assert!(e.contains("0xff"), "{e}");
    }
}
