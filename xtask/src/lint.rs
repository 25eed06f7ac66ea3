//! `cargo xtask lint`: formatting and clippy, userspace and eBPF separately
//! (the eBPF crate only builds for its own target).

use crate::{cargo, status, toolchain};

pub fn run() -> anyhow::Result<()> {
    toolchain::ensure()?;
    status(cargo().args(["fmt", "--all", "--check"]))?;
    status(cargo().args([
        "clippy",
        "--locked",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    status(
        cargo()
            .args([
                "clippy",
                "--locked",
                "--package",
                "redirect-ebpf",
                "--release",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--",
                "-D",
                "warnings",
            ])
            // Keep this build apart from the host one so neither invalidates
            // the other.
            .env(
                "CARGO_TARGET_DIR",
                crate::run::target_dir()?.join("ebpf-lint"),
            ),
    )
}
