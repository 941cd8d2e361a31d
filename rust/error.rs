//! One error type for the whole crate. The bindings map each variant to one Python exception
//! class in one place (`py/errors.rs`); messages say what was wrong, what was received and
//! what was expected.

/// Every way a ferrolm core call can fail.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A caller passed a value outside what the function accepts (maps to `ValueError`).
    #[error("{0}")]
    Value(String),
    /// A token id that the vocabulary does not have (maps to `UnknownTokenError`).
    #[error("token id {id} is not in the vocabulary (valid ids: {valid})")]
    UnknownId { id: i128, valid: String },
    /// A token string or byte sequence that the vocabulary does not have.
    #[error("token {0} is not in the vocabulary")]
    UnknownToken(String),
    /// A special token appeared in text where it was not allowed.
    #[error(
        "encountered text corresponding to disallowed special token {0:?}; pass \
         allowed_special={{{0:?}}} (or \"all\") to encode it as a special token, or \
         disallowed_special=() to encode it as ordinary text"
    )]
    DisallowedSpecial(String),
    /// A file or buffer that does not follow its format (maps to `ferrolm.FormatError`).
    #[error("{0}")]
    Format(String),
    /// An operating-system error while reading or writing a file.
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn value(msg: impl Into<String>) -> Self {
        Error::Value(msg.into())
    }
    pub(crate) fn format(msg: impl Into<String>) -> Self {
        Error::Format(msg.into())
    }
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Error::Io { path: path.display().to_string(), source }
    }
    /// An allocation of `bytes` for `what` that the system refused: an `Io` error of kind
    /// `OutOfMemory`, which the bindings raise as `MemoryError` (never an abort).
    pub(crate) fn out_of_memory(what: &str, bytes: usize) -> Self {
        let msg = format!("cannot allocate {bytes} bytes; ask for a smaller output");
        Error::Io {
            path: what.to_string(),
            source: std::io::Error::new(std::io::ErrorKind::OutOfMemory, msg),
        }
    }
    /// Whether this is an [`out_of_memory`](Self::out_of_memory) error.
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::OutOfMemory)
    }
}
