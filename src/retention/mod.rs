//! Retention: which snapshots to keep (`policy`, pure grandfather-father-son over a list of
//! snapshots) and the executor that deletes the rest on the targets (`prune`).
pub mod policy;
pub mod prune;

pub use policy::*;
