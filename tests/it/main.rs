//! Integration tests: one binary, a module per user flow.
