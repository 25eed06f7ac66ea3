//! `cargo xtask test`: install what is needed, build everything, run the
//! whole suite (privileged eBPF tests included) and print one summary line.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
};

use anyhow::Context as _;

use crate::{cargo, is_root, status, toolchain};

/// Arguments of `cargo xtask test`.
#[derive(clap::Args)]
pub struct Options {
    /// Only run tests whose name contains this filter.
    filter: Option<String>,
    /// Run the suite in a qemu guest on this kernel instead of the host's:
    /// a version to fetch (`6.1`, Debian 12's) or the path of a bzImage.
    #[arg(long, value_name = "VERSION|VMLINUZ")]
    kernel: Option<String>,
}

pub fn run(opts: Options) -> anyhow::Result<()> {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    if let Some(kernel) = &opts.kernel {
        // The guest runs the suite as its root: no sudo on the host.
        return crate::vm::run(kernel, opts.filter.as_deref(), ci);
    }
    toolchain::ensure()?;
    toolchain::ensure_test_tools()?;
    if ci && !is_root() {
        anyhow::bail!("CI=true but not root: the privileged eBPF tests must run, never skip");
    }
    // The integration tests run the `redirect` and `probe` binaries, and
    // the library's container_runtime example.
    status(cargo().args(["build", "--locked", "--bins", "--examples"]))?;
    let upgrade = test_object("upgrade-test")?;
    let no_cell = test_object("no-cell-test")?;

    if !is_root() {
        eprintln!("xtask: not root, running the test binaries through sudo -E");
    }
    let mut totals = Totals::default();
    let mut cmd = cargo();
    cmd.args(["test", "--locked", "--no-fail-fast"])
        .env(UPGRADE_OBJECT_ENV, &upgrade)
        .env(NO_CELL_OBJECT_ENV, &no_cell);
    if let Some(filter) = &opts.filter {
        cmd.arg(filter);
    }
    let mut ok = cargo_test(cmd, &mut totals)?;
    if opts.filter.is_none() {
        // The binary users install is the static-pie release build: the
        // tests that run `redirect` as a process (the CLI, user lookups by
        // name, the daemon, the OCI hook with runc and podman) again,
        // against it. (This pass found a static glibc crashing on an
        // unknown user name: see `redirect::user::use_files_only`.)
        let release = crate::run::build_release(cargo())?;
        eprintln!(
            "xtask: {} again, against the release binary {}",
            RELEASE_TESTS.join(", "),
            release.display()
        );
        let mut again = cargo();
        again
            .args(["test", "--locked", "--no-fail-fast", "-p", "redirect-tests"])
            .args(RELEASE_TESTS.iter().flat_map(|t| ["--test", t]))
            .env(RELEASE_BINARY_ENV, &release);
        ok &= cargo_test(again, &mut totals)?;
    }
    println!(
        "summary: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    anyhow::ensure!(ok, "cargo test failed");
    if ci {
        anyhow::ensure!(
            totals.ignored == 0,
            "CI=true: {} test(s) were skipped",
            totals.ignored
        );
    }
    Ok(())
}

/// Runs `cmd` (a `cargo test`; through `sudo -E` when not root), echoing
/// its output and adding its results to `totals`; returns whether it
/// succeeded.
fn cargo_test(mut cmd: Command, totals: &mut Totals) -> anyhow::Result<bool> {
    if !is_root() {
        cmd.env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER", "sudo -E");
    }
    cmd.stdout(Stdio::piped());
    let mut child = cmd.spawn().context("running cargo test")?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        totals.add(&line);
    }
    Ok(child.wait()?.success())
}

/// The test files run a second time against the release binary.
const RELEASE_TESTS: [&str; 6] = ["cli", "grant", "daemon", "oci_hook", "oci", "podman"];

/// tests/src/lib.rs's `REDIRECT_BIN_ENV`: the `redirect` the tests run.
const RELEASE_BINARY_ENV: &str = "REDIRECT_TEST_BINARY";

/// Where tests/tests/upgrade.rs finds the other build of the programs.
pub const UPGRADE_OBJECT_ENV: &str = "REDIRECT_TEST_UPGRADE_OBJECT";

/// Where tests/tests/upgrade.rs finds a build of the programs from before
/// the scope cell.
pub const NO_CELL_OBJECT_ENV: &str = "REDIRECT_TEST_NO_CELL_OBJECT";

/// Builds the eBPF object with test feature `feature` of `redirect-ebpf`
/// (`upgrade-test`: connect4/6 differ by one harmless helper call;
/// `no-cell-test`: no program reads the scope cell), as aya-build builds
/// the embedded one, in a target directory of its own; returns its path.
pub fn test_object(feature: &str) -> anyhow::Result<std::path::PathBuf> {
    let dir = crate::run::target_dir()?.join(format!("ebpf-{feature}"));
    status(
        cargo()
            .args([
                "build",
                "--locked",
                "--package",
                "redirect-ebpf",
                "--bins",
                "--release",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--features",
                feature,
            ])
            .env(
                "CARGO_ENCODED_RUSTFLAGS",
                "--cfg=bpf_target_arch=\"x86_64\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf",
            )
            .env("CARGO_TARGET_DIR", &dir),
    )?;
    Ok(dir.join("bpfel-unknown-none/release/redirect"))
}

/// Test counts summed over libtest's result lines.
#[derive(Default)]
pub struct Totals {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl Totals {
    /// Adds one "test result: ok. 3 passed; 0 failed; 1 ignored; …" line.
    pub fn add(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}
