//! `cargo xtask run ARGS…`: build, then `redirect run ARGS…` in the
//! foreground.

use std::{ffi::OsString, process::Command};

use anyhow::Context as _;

use crate::{cargo, is_root, status, toolchain};

/// Arguments of `cargo xtask run`.
#[derive(clap::Args)]
pub struct Options {
    /// Arguments passed to `redirect run`, such as `--map 443:8443`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<OsString>,
}

pub fn run(opts: Options) -> anyhow::Result<()> {
    toolchain::ensure()?;
    let bin = build_release(cargo())?;
    let mut cmd = if is_root() {
        Command::new(&bin)
    } else {
        eprintln!("xtask: not root, running through sudo -E");
        let mut c = Command::new("sudo");
        c.arg("-E").arg(&bin);
        c
    };
    cmd.arg("run").args(&opts.args);
    // Ctrl-C reaches redirect directly (same process group); exit as it did.
    let code = cmd
        .status()
        .with_context(|| format!("running {}", bin.display()))?
        .code()
        .unwrap_or(1);
    std::process::exit(code);
}

/// Builds the release `redirect` (with `cargo`, which the caller may wrap
/// in `nice`) and returns its path.
///
/// Linked statically (`static-pie`: still position-independent, so still
/// randomised): a process then starts in ~0.8 ms instead of ~1.5 ms on
/// this kind of VM, as the dynamic loader has no libraries to map and no
/// symbols to bind. It matters for `redirect oci-hook`, which runs on every
/// container start. Only the binary's own link step differs (`cargo rustc`
/// passes the flag to it alone), so the library, the tests and the
/// proc-macros build as usual. A static glibc cannot load NSS modules
/// safely, so this binary resolves user names (`--owner NAME`, `--user
/// NAME`) from /etc/passwd and /etc/group only
/// (`redirect::user::use_files_only`); numeric ids always work.
/// `cargo xtask test` runs the process-level tests against it too.
pub fn build_release(mut cargo: Command) -> anyhow::Result<std::path::PathBuf> {
    status(cargo.args([
        "rustc",
        "--locked",
        "--release",
        "--package",
        "redirect-user",
        "--bin",
        "redirect",
        "--",
        "-C",
        "target-feature=+crt-static",
    ]))?;
    Ok(target_dir()?.join("release/redirect"))
}

/// The cargo target directory (honours CARGO_TARGET_DIR).
pub fn target_dir() -> anyhow::Result<std::path::PathBuf> {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return Ok(dir.into());
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask has no parent directory")?;
    Ok(root.join("target"))
}
