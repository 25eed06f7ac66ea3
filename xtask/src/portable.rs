//! `cargo xtask portable`: what macOS and Windows users get, checked on
//! Linux. (1) `cargo check` of the userspace crates for macOS (x86_64 and
//! aarch64) and Windows, building std from source (`-Z build-std`, no
//! target SDK needed since nothing is linked); (2) the proxy and doctor
//! tests against a `redirect` built without the eBPF backend
//! (`--no-default-features`), the same code path those systems run.

use crate::{cargo, run::target_dir, status, toolchain};

/// The targets checked; only the proxy backend is compiled for them.
const TARGETS: [&str; 3] = [
    "x86_64-apple-darwin",
    "aarch64-apple-darwin",
    "x86_64-pc-windows-msvc",
];

/// Arguments of `cargo xtask portable`.
#[derive(clap::Args)]
pub struct Options {
    /// Only the cross-target checks, not the tests.
    #[arg(long)]
    check_only: bool,
}

pub fn run(opts: Options) -> anyhow::Result<()> {
    cross_check()?;
    if !opts.check_only {
        proxy_tests_without_ebpf()?;
    }
    Ok(())
}

/// `cargo check` of redirect-user (lib and binary) for every target.
pub fn cross_check() -> anyhow::Result<()> {
    let dir = target_dir()?.join("cross");
    for target in TARGETS {
        eprintln!("xtask: cargo check for {target} (std built from source)");
        status(
            cargo()
                .args([
                    "check",
                    "--locked",
                    "--package",
                    "redirect-user",
                    "--bins",
                    "--lib",
                    "-Zbuild-std=std,panic_abort",
                    "--target",
                    target,
                ])
                // cargo itself (not only rustc) must accept -Z.
                .env("RUSTC_BOOTSTRAP", "1")
                .env("CARGO_TARGET_DIR", &dir),
        )?;
    }
    Ok(())
}

/// Builds `redirect` without the eBPF backend in a target directory of its
/// own (so it never replaces the default build the other tests run), and
/// runs the proxy and doctor tests against it.
pub fn proxy_tests_without_ebpf() -> anyhow::Result<()> {
    toolchain::ensure_test_tools()?;
    let dir = target_dir()?.join("no-ebpf");
    eprintln!("xtask: proxy and doctor tests with the eBPF backend compiled out");
    status(
        cargo()
            .args([
                "build",
                "--locked",
                "--no-default-features",
                "--package",
                "redirect-user",
                "--bins",
            ])
            .env("CARGO_TARGET_DIR", &dir),
    )?;
    status(
        cargo()
            .args([
                "test",
                "--locked",
                "--no-default-features",
                "--package",
                "redirect-tests",
                "--test",
                "proxy",
                "--test",
                "doctor",
            ])
            .env("CARGO_TARGET_DIR", &dir),
    )
}
