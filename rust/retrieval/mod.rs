//! Retrieval of in-context demonstrations: ranking a pool of tokenized examples against a
//! query. Rows arrive as [`crate::data::Row`], borrowed in their source integer type.

pub mod bm25;
