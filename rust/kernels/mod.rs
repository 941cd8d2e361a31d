//! Fused CPU kernels: LSTM and GRU layers (forward and backward through time), attention
//! (forward, backward, and single-token decode over KV caches) and dropout.
//!
//! Kernels are generic over [`Float`] (f32 for speed, f64 so gradients can be checked with
//! `torch.autograd.gradcheck`). In f32 the products run on the packed AVX-512/AVX2 kernel of
//! [`smallmm`]; the `gemm` crate ([`matmul`]) serves the f64 path, and in f32 only the
//! recurrent step product when more than 256 rows are active. What is fused by hand is the
//! work no library provides: gate nonlinearities and state updates around the recurrent
//! product, and the masked softmax between the attention products.

mod alloc;
mod float;
mod mat;

pub mod attention;
pub mod decode;
pub mod dropout;
pub mod quant;
pub mod rnn;
pub mod simd;
pub mod smallmm;
pub mod team;

pub use alloc::zeroed;
pub use float::Float;
pub use mat::{matmul, Mat};
