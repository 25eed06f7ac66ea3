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
    status(cargo().args([
        "build",
        "--locked",
        "--release",
        "--package",
        "redirect-user",
        "--bin",
        "redirect",
    ]))?;
    let bin = target_dir()?.join("release/redirect");
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
