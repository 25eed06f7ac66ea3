//! This file exists to enable the library target, which lets
//! `redirect-user` list this crate as a build-dependency (so cargo rebuilds
//! the embedded object when these sources change). The programs are in the
//! `redirect` binary target, compiled for `bpfel-unknown-none`.
#![no_std]
