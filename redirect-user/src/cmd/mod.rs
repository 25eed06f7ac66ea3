//! Verbs and options of the `redirect` command that live outside main.rs:
//! one file per concern (tubular's `cmd/tubectl` layout).

#[cfg(with_ebpf)]
pub mod daemon;
pub mod doctor;
#[cfg(with_ebpf)]
pub mod oci_hook;
pub mod proxy;
