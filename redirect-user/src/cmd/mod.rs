//! The verbs of the `redirect` command that have files of their own.

pub mod daemon;
pub mod oci_hook;
