//! `kubectl migrate`: the plugin's library, so tests reach each step. Where things live:
//! - [`cli`]: the command line, kubectl's conventions;
//! - [`client`]: the one Kubernetes client builder;
//! - [`rewrite`]: the target pod as a pure function of the source pod.
//!
//! The migration pipeline (check → checkpoint → transfer → restore → verify → cleanup) is
//! being built step by step; see README.md.

pub mod cli;
pub mod client;
pub mod rewrite;
