//! Installs, idempotently, what building the eBPF programs needs: rust-src
//! for `-Z build-std=core`, Debian's llvm-22-dev, and bpf-linker 0.13 built
//! against it. Each install prints one line saying what and why.

use std::{path::Path, process::Command};

use anyhow::Context as _;

use crate::{is_root, status};

/// The toolchain aya-build runs (see redirect-user/build.rs).
const TOOLCHAIN: &str = "stable";
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PACKAGE: &str = "llvm-22-dev";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// Makes sure every piece is there; installs what is missing.
pub fn ensure() -> anyhow::Result<()> {
    ensure_rust_src()?;
    ensure_bpf_linker()
}

fn ensure_rust_src() -> anyhow::Result<()> {
    let out = Command::new("rustc")
        .args([&format!("+{TOOLCHAIN}"), "--print", "sysroot"])
        .output()
        .context("running rustc; is rustup installed?")?;
    anyhow::ensure!(
        out.status.success(),
        "rustc +{TOOLCHAIN} failed: install the {TOOLCHAIN} toolchain with rustup"
    );
    let sysroot = String::from_utf8(out.stdout)?;
    let src = Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library/core");
    if src.exists() {
        return Ok(());
    }
    eprintln!("xtask: installing rust-src (the eBPF build compiles core from source)");
    status(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", TOOLCHAIN]))
}

fn bpf_linker_ok() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
        })
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    if bpf_linker_ok() {
        return Ok(());
    }
    ensure_llvm()?;
    eprintln!(
        "xtask: installing bpf-linker {BPF_LINKER_VERSION} against {LLVM_PACKAGE} (links the eBPF object)"
    );
    status(
        crate::cargo()
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", LLVM_PREFIX)
            // Not the workspace's: bpf-linker is a normal host build.
            .env_remove("RUSTC_BOOTSTRAP"),
    )?;
    anyhow::ensure!(
        bpf_linker_ok(),
        "bpf-linker {BPF_LINKER_VERSION} was installed but is not on PATH: add ~/.cargo/bin to PATH"
    );
    Ok(())
}

fn ensure_llvm() -> anyhow::Result<()> {
    if Path::new(LLVM_PREFIX).join("bin/llvm-config").exists() {
        return Ok(());
    }
    eprintln!("xtask: installing {LLVM_PACKAGE} with apt-get (bpf-linker is built against it)");
    apt_install(&[LLVM_PACKAGE])
}

/// The programs the integration tests run, with the Debian package that
/// provides each. The container tests run `runc` and copy the static
/// busybox into their rootfs (Debian's `busybox` package is dynamic and
/// would not run there).
const TEST_TOOLS: [(&str, &str); 11] = [
    ("ip", "iproute2"),
    ("dig", "bind9-dnsutils"),
    ("dnsmasq", "dnsmasq-base"),
    ("unshare", "util-linux"),
    ("findmnt", "util-linux"),
    ("setpriv", "util-linux"),
    ("runc", "runc"),
    ("busybox", "busybox-static"),
    // The same hook through podman (tests/tests/podman.rs): an image
    // imported from a local busybox tarball, no registry.
    ("podman", "podman"),
    // Real PROXY protocol peers for the proxy tests (each test starts its
    // own instance with its own config, on a port it picked).
    ("nginx", "nginx"),
    ("haproxy", "haproxy"),
];

/// Installs the programs the tests need (the `dnsmasq-base` package ships
/// the binary without starting a system service).
pub fn ensure_test_tools() -> anyhow::Result<()> {
    ensure_tools(&TEST_TOOLS, "the tests")
}

/// What `cargo xtask test --kernel` needs on the host: qemu (the guest
/// runs under its software emulation), a static busybox (the guest's shell
/// and mount, insmod, poweroff…), objcopy (strips the test binaries), and
/// apt-get/dpkg-deb to fetch and unpack the kernel package.
const VM_TOOLS: [(&str, &str); 3] = [
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("busybox", "busybox-static"),
    ("objcopy", "binutils"),
];

/// Installs what booting the suite in a qemu guest needs.
pub fn ensure_vm_tools() -> anyhow::Result<()> {
    ensure_tools(&VM_TOOLS, "cargo xtask test --kernel")
}

/// Installs, with apt-get, the packages of whichever `(binary, package)`
/// pairs have no binary on PATH; `purpose` says who needs them.
pub fn ensure_tools(tools: &[(&str, &str)], purpose: &str) -> anyhow::Result<()> {
    let mut missing: Vec<&str> = tools
        .iter()
        .filter(|(bin, _)| !on_path(bin))
        .map(|(_, package)| *package)
        .collect();
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!(
        "xtask: installing {} with apt-get (used by {purpose})",
        missing.join(" ")
    );
    apt_install(&missing)
}

/// Whether `bin` is in PATH or the sbin directories (an absolute `bin` is
/// checked as is).
fn on_path(bin: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .any(|dir| dir.join(bin).is_file())
}

/// apt-get as root (through sudo when not root), non-interactive.
fn apt(args: &[&str]) -> Command {
    let mut cmd = if is_root() {
        Command::new("apt-get")
    } else {
        let mut c = Command::new("sudo");
        c.arg("apt-get");
        c
    };
    // Wait for another apt (unattended upgrades, a second xtask) rather
    // than failing at once on its lock.
    cmd.args(["-o", "DPkg::Lock::Timeout=600"])
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

/// Refreshes the package lists.
pub fn apt_update() -> anyhow::Result<()> {
    status(&mut apt(&["update", "-qq"]))
}

/// Installs Debian packages (through sudo when not root).
pub fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    apt_update()?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend_from_slice(packages);
    status(&mut apt(&args))
}
