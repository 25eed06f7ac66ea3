//! Verbs and options of the `redirect` command that live outside main.rs:
//! one file per concern (tubular's `cmd/tubectl` layout).

pub mod daemon;
pub mod doctor;
pub mod oci_hook;
pub mod proxy;
