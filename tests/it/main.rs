//! Integration tests: one binary, a module per user flow, against real PostgreSQL and Garage
//! servers started by `support` on loopback ports.

mod backup;
mod cli;
mod deploy;
mod faults;
mod restore;
mod support;
mod verify;
