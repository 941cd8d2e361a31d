//! Token shards on disk: a 32-byte header and the ids, read with positioned reads.
//!
//! Layout (little-endian): `magic` 8 bytes `b"FLMTOKS\0"`, `version` u32 (1), `itemsize` u32
//! (2 for uint16, 4 for uint32), `count` u64 (number of ids), 8 reserved bytes (0), then
//! `count` ids. A shard is written to a temporary name and renamed when complete, so a reader
//! never sees half a file under the final name.
//!
//! Reading never maps the file: a map of a file that is truncated after it was opened raises
//! SIGBUS on access, which no check can prevent (the file can shrink between a check and the
//! access). [`Shard::gather`] copies with `pread`, so a shard that shrank is a `FormatError`
//! naming the file. (The numpy memmap that `TokenShard.tokens` offers is the caller's to keep
//! valid: do not rewrite or truncate a shard that is open.)
//! Measured (page cache warm): a 64 x 1025 uint16 gather takes 52 us with `pread` against 31 us
//! from the map; checking the length before reading the map would still race a truncation.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The file magic.
pub const MAGIC: &[u8; 8] = b"FLMTOKS\0";
/// The format version this build writes and the newest it reads.
pub const VERSION: u32 = 1;
/// Header size in bytes.
pub const HEADER: usize = 32;

/// Id width on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    U16,
    U32,
}

impl Dtype {
    /// uint16 when every id is below 65,536, else uint32.
    pub fn for_vocab(n_vocab: usize) -> Self {
        if n_vocab <= 1 << 16 {
            Dtype::U16
        } else {
            Dtype::U32
        }
    }
    /// Bytes per id.
    pub fn itemsize(self) -> usize {
        match self {
            Dtype::U16 => 2,
            Dtype::U32 => 4,
        }
    }
    fn max(self) -> u64 {
        match self {
            Dtype::U16 => u16::MAX as u64,
            Dtype::U32 => u32::MAX as u64,
        }
    }
}

/// Writes one shard.
pub struct ShardWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: Option<BufWriter<File>>,
    dtype: Dtype,
    count: u64,
}

impl ShardWriter {
    /// Starts a shard that will appear at `path` when [`finish`](Self::finish) succeeds.
    pub fn create(path: &Path, dtype: Dtype) -> Result<Self> {
        let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&[0u8; HEADER]).map_err(|e| Error::io(&tmp, e))?;
        Ok(ShardWriter { path: path.to_path_buf(), tmp, out: Some(out), dtype, count: 0 })
    }

    /// Ids written so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Appends ids; each must fit the shard's dtype.
    pub fn append(&mut self, ids: &[u32]) -> Result<()> {
        let max = self.dtype.max();
        if let Some(&bad) = ids.iter().find(|&&x| x as u64 > max) {
            return Err(Error::value(format!(
                "id {bad} does not fit this shard's {:?}; use a uint32 shard for vocabularies \
                 over 65,536",
                self.dtype
            )));
        }
        let out = self.out.as_mut().ok_or_else(|| Error::value("shard already finished"))?;
        let r = match self.dtype {
            Dtype::U16 => {
                let buf: Vec<u8> = ids.iter().flat_map(|&x| (x as u16).to_le_bytes()).collect();
                out.write_all(&buf)
            }
            Dtype::U32 => {
                let buf: Vec<u8> = ids.iter().flat_map(|&x| x.to_le_bytes()).collect();
                out.write_all(&buf)
            }
        };
        r.map_err(|e| Error::io(&self.tmp, e))?;
        self.count += ids.len() as u64;
        Ok(())
    }

    /// Writes the header, syncs, and renames the shard into place.
    pub fn finish(mut self) -> Result<PathBuf> {
        let out = self.out.take().ok_or_else(|| Error::value("shard already finished"))?;
        let mut file = out.into_inner().map_err(|e| Error::io(&self.tmp, e.into_error()))?;
        let mut header = [0u8; HEADER];
        header[..8].copy_from_slice(MAGIC);
        header[8..12].copy_from_slice(&VERSION.to_le_bytes());
        header[12..16].copy_from_slice(&(self.dtype.itemsize() as u32).to_le_bytes());
        header[16..24].copy_from_slice(&self.count.to_le_bytes());
        let io = |e| Error::io(&self.tmp, e);
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.write_all(&header).map_err(io)?;
        file.sync_all().map_err(io)?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path).map_err(|e| Error::io(&self.path, e))?;
        Ok(self.path.clone())
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        if self.out.is_some() {
            // Abandoned (error or interrupt): remove the temporary file, never the target.
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// An open shard, its header validated.
pub struct Shard {
    file: File,
    dtype: Dtype,
    count: usize,
    path: PathBuf,
}

impl Shard {
    /// Opens and validates a shard.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let p = path.display();
        let mut h = [0u8; HEADER];
        if size < HEADER as u64 || file.read_exact_at(&mut h, 0).is_err() {
            return Err(Error::format(format!(
                "{p}: {size} bytes is too short for a shard header ({HEADER} bytes); the file is \
                 truncated or not a shard"
            )));
        }
        if &h[..8] != MAGIC {
            return Err(Error::format(format!(
                "{p}: not a ferrolm token shard (bad magic {:?})",
                &h[..8]
            )));
        }
        let word = |a: usize| u32::from_le_bytes([h[a], h[a + 1], h[a + 2], h[a + 3]]);
        let version = word(8);
        if version > VERSION {
            return Err(Error::format(format!(
                "{p}: shard format version {version} is newer than this ferrolm reads \
                 (up to {VERSION}); upgrade ferrolm"
            )));
        }
        if version == 0 {
            return Err(Error::format(format!("{p}: shard format version 0 is invalid")));
        }
        let dtype = match word(12) {
            2 => Dtype::U16,
            4 => Dtype::U32,
            other => {
                return Err(Error::format(format!(
                    "{p}: unsupported id size {other} bytes (expected 2 or 4)"
                )))
            }
        };
        let mut c = [0u8; 8];
        c.copy_from_slice(&h[16..24]);
        let count = u64::from_le_bytes(c);
        let expect = count
            .checked_mul(dtype.itemsize() as u64)
            .and_then(|b| b.checked_add(HEADER as u64))
            .ok_or_else(|| Error::format(format!("{p}: id count {count} overflows")))?;
        if expect != size {
            return Err(Error::format(format!(
                "{p}: header says {count} ids ({expect} bytes) but the file has {size} bytes; \
                 the shard is truncated or corrupt"
            )));
        }
        let count = usize::try_from(count)
            .map_err(|_| Error::format(format!("{p}: id count {count} overflows")))?;
        Ok(Shard { file, dtype, count, path: path.to_path_buf() })
    }

    /// Number of ids.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the shard holds no ids.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The stored id width.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Gathers `len` ids from each start into a row-major `(starts.len(), len)` int64 buffer.
    ///
    /// Every range is checked against the count before anything is allocated; the ids are
    /// copied with positioned reads, so a file that shrank since [`open`](Self::open) is a
    /// `Format` error, not a crash.
    pub fn gather(&self, starts: &[u64], len: usize) -> Result<Vec<i64>> {
        if len > self.count {
            return Err(Error::value(format!(
                "length={len} is more than the shard's {} ids",
                self.count
            )));
        }
        for (r, &s) in starts.iter().enumerate() {
            if s.checked_add(len as u64).is_none_or(|e| e > self.count as u64) {
                return Err(Error::value(format!(
                    "block {r} = [{s}, {s}+{len}) is outside the shard's {} ids",
                    self.count
                )));
            }
        }
        let n = starts.len();
        // Every cell is a real id (no padding), so the only cap is the count: n * len ids.
        let cells = n.checked_mul(len).ok_or_else(|| {
            Error::value(format!("{n} blocks of length={len} overflow; ask for fewer ids"))
        })?;
        let what = || format!("TokenShard.blocks: a {n} x {len} int64 batch");
        let mut out = super::try_filled(cells, 0i64, what)?;
        let size = self.dtype.itemsize();
        let mut buf = super::try_filled(len * size, 0u8, what)?;
        for (r, &s) in starts.iter().enumerate() {
            let offset = HEADER as u64 + s * size as u64;
            self.file.read_exact_at(&mut buf, offset).map_err(|e| {
                Error::format(format!(
                    "{}: cannot read ids [{s}, {s}+{len}) ({e}); the shard was truncated or \
                     rewritten after it was opened; do not modify a shard while it is read",
                    self.path.display()
                ))
            })?;
            let dst = &mut out[r * len..(r + 1) * len];
            match self.dtype {
                Dtype::U16 => dst
                    .iter_mut()
                    .zip(buf.chunks_exact(2))
                    .for_each(|(d, b)| *d = u16::from_le_bytes([b[0], b[1]]) as i64),
                Dtype::U32 => dst
                    .iter_mut()
                    .zip(buf.chunks_exact(4))
                    .for_each(|(d, b)| *d = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_round_trip_and_corruption() {
        let dir = std::env::temp_dir().join(format!("ferrolm-shard-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.bin");
        let mut w = ShardWriter::create(&path, Dtype::U16).unwrap();
        w.append(&[1, 2, 3, 65535]).unwrap();
        assert!(w.append(&[70000]).is_err());
        assert!(!path.exists());
        w.finish().unwrap();
        let s = Shard::open(&path).unwrap();
        assert_eq!(s.len(), 4);
        assert_eq!(s.gather(&[1, 0], 3).unwrap(), vec![2, 3, 65535, 1, 2, 3]);
        assert!(s.gather(&[2], 3).is_err());
        // Truncated.
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(dir.join("t.bin"), &bytes[..bytes.len() - 1]).unwrap();
        assert!(matches!(Shard::open(&dir.join("t.bin")), Err(Error::Format(_))));
        // Newer version.
        let mut newer = bytes.clone();
        newer[8] = 2;
        std::fs::write(dir.join("n.bin"), &newer).unwrap();
        let e = Shard::open(&dir.join("n.bin")).err().unwrap().to_string();
        assert!(e.contains("newer"), "{e}");
        std::fs::write(dir.join("s.bin"), b"short").unwrap();
        assert!(Shard::open(&dir.join("s.bin")).is_err());
        // Truncated after it was opened: an error naming the file, not SIGBUS.
        let s = Shard::open(&path).unwrap();
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(34).unwrap();
        assert_eq!(s.gather(&[0], 1).unwrap(), vec![1]);
        let e = s.gather(&[1], 3).unwrap_err();
        assert!(matches!(e, Error::Format(_)) && e.to_string().contains("truncated"), "{e}");
        assert!(s.gather(&[u64::MAX], 2).is_err());
        assert!(s.gather(&[0; 4], usize::MAX).is_err());
        assert!(Shard::open(&dir.join("s.bin")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
