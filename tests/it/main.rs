//! Integration tests: one binary, a module per user flow, against real PostgreSQL and Garage
//! servers started by `support` on loopback ports.

mod backup;
mod cli;
mod daemon;
mod deploy;
mod faults;
mod repair;
mod restore;
mod retention;
mod security;
mod source_faults;
mod spool_faults;
mod support;
mod target_faults;
mod verify;
mod write_once;
