//! `kubectl migrate`: the plugin's library, so tests reach each step. Where things live:
//! - [`cli`]: the command line, kubectl's conventions;
//! - [`client`]: the one Kubernetes client builder;
//! - [`check`]: the preflight, every reason the move would fail, with its fix;
//! - [`launchers`]: the seam to the launchers in the containers, and its typed errors;
//! - [`exec`]: `restore-launcher` sub-commands run in containers through the exec API;
//! - [`rewrite`]: the target pod as a pure function of the source pod;
//! - [`migrate`]: the pipeline (check → target → checkpoint+transfer → verify → commit →
//!   thaw+cleanup; undo before the commit, finish after it);
//! - [`recover`]: `status`, `abort` and `resume` of migrations that did not finish;
//! - [`drain`]: `drain NODE`, every pod of a node migrated (or else evicted) by that pipeline;
//! - [`crd`]: the declarative API's types (`PodMigration`), which generate `config/crd/`;
//! - [`controller`]: the in-cluster controller that carries PodMigrations out with [`migrate`];
//! - [`submit`]: the plugin as the controller's client (`--async`, `status`, `check`'s mode).
//!
//! `docs/architecture.md` describes the pipeline and its undo rule; CONTRIBUTING.md maps the
//! modules of both binaries.

pub mod check;
pub mod cli;
pub mod client;
pub mod controller;
pub mod crd;
pub mod drain;
pub mod exec;
pub mod launchers;
pub mod migrate;
pub mod record;
pub mod recover;
pub mod retry;
pub mod rewrite;
pub mod submit;
pub mod wait;
