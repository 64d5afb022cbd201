//! Shared helpers for the system tests live in the xtask library.
