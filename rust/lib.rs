//! ferrolm: the Rust engine behind the `ferrolm` Python package.
//!
//! The core never knows Python exists: every module here works on slices and owned values and
//! returns [`Result`]. The bindings live in `py/` and compile only with the `python` feature, so
//! `cargo test` needs no libpython.

pub mod bpe;
pub mod data;
pub mod error;
pub mod kernels;
pub mod parallel;
pub mod retrieval;

#[cfg(feature = "python")]
mod py;

#[cfg(test)]
pub(crate) mod testutil;

pub use error::{Error, Result};
