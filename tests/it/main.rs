//! Integration tests: one binary, a module per user flow, against real PostgreSQL and Garage
//! servers started by `support` on loopback ports.

mod backup;
mod bounded_waits;
mod catalog;
mod cli;
mod daemon;
mod deploy;
mod encryption;
mod faults;
mod files_backup;
mod files_restore;
mod files_storage;
mod fleet;
mod fleet_verify;
mod notify;
mod odoo_neutralize;
mod ops;
mod production_guard;
mod redaction;
mod repair;
mod restore;
mod restore_signals;
mod retention;
mod review13;
mod review15;
mod review17;
mod review18;
mod review19;
mod review2;
mod review3;
mod security;
mod support;
mod verify;
mod write_once;
