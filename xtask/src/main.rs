//! Developer tasks for redirect: `cargo xtask run|test|lint`.
//!
//! xtask builds and runs; it never links the workspace crates, so it stays
//! fast to compile. The eBPF object itself is built by redirect-user's
//! build.rs (aya-build); xtask only makes sure the toolchain that build
//! needs is installed.

mod bench;
mod lint;
mod portable;
mod run;
mod test;
mod toolchain;
mod vm;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "Build, run and test redirect")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build and run `redirect run ARGS…` in the foreground (as root; through
    /// `sudo -E` when not root). Example: cargo xtask run --map 443:8443
    Run(run::Options),
    /// Build the release `redirect` (linked static-pie, the binary to
    /// install or put in an image) and print its path.
    Build,
    /// Install what the build needs, build everything and run the whole test
    /// suite, the privileged eBPF tests included (in a qemu guest with
    /// `--kernel 6.1`).
    Test(test::Options),
    /// rustfmt check and clippy (-D warnings) for userspace and eBPF.
    Lint,
    /// What macOS and Windows get: check the userspace crates for their
    /// targets, and run the proxy and doctor tests without the eBPF backend.
    Portable(portable::Options),
    /// Measure every path (direct, redirect, iptables, socat, HAProxy…)
    /// side by side; writes target/bench/report.md and ratios.png.
    Bench(bench::Options),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run(opts) => run::run(opts),
        Command::Build => {
            toolchain::ensure()?;
            println!("{}", run::build_release(cargo())?.display());
            Ok(())
        }
        Command::Test(opts) => test::run(opts),
        Command::Lint => lint::run(),
        Command::Portable(opts) => portable::run(opts),
        Command::Bench(opts) => bench::run(opts),
    }
}

/// Runs `cmd`, failing with its command line if it does not succeed.
fn status(cmd: &mut std::process::Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .map_err(|e| anyhow::anyhow!("running {cmd:?}: {e}"))?;
    anyhow::ensure!(status.success(), "{cmd:?} failed: {status}");
    Ok(())
}

/// Whether this process runs as root.
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// The `cargo` that runs this xtask.
fn cargo() -> std::process::Command {
    std::process::Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}
