//! Storage: the object stores snapshots live in and everything about their contents.
//!
//! `target` builds the store clients and owns the key layout; `upload` owns one multipart
//! upload from start to completion or abort; `manifest` is the commit document (no I/O);
//! `catalog` reads what exists. Deciding what to commit is `backup`'s, what to delete
//! `retention`'s.
pub mod catalog;
pub mod catalog_index;
pub mod key;
pub mod manifest;
pub mod target;
pub mod upload;
