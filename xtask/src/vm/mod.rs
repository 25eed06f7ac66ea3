//! `cargo xtask test --kernel 6.1|PATH`: the privileged suite on another
//! kernel, in a qemu guest.
//!
//! The host builds the test binaries, packs them into an initramfs with
//! everything they run (the `redirect` and `probe` binaries, busybox, ip,
//! dig, dnsmasq, util-linux tools, and the shared libraries of each), boots
//! the kernel under qemu TCG with `init.sh` as its init, and reads the
//! guest's exit status from the serial console.
//!
//! Layout: `kernel.rs` fetches the kernel and finds its modules,
//! `initramfs.rs` writes the archive, `qemu.rs` boots and watches the guest.

mod initramfs;
mod kernel;
mod qemu;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::Context as _;
use initramfs::Initramfs;

use crate::{cargo, status, test::Totals, toolchain};

/// The guest's init (a busybox shell script).
const INIT: &str = include_str!("init.sh");

/// Programs the tests run (see tests/tests/*.rs and tests/src/lib.rs),
/// copied from the host with their shared libraries. busybox provides the
/// shell and everything else (mount, umount, insmod…).
const GUEST_TOOLS: [&str; 6] = ["ip", "dig", "dnsmasq", "findmnt", "unshare", "setpriv"];

/// Where the guest finds the workspace's binaries: the same
/// `target/<profile>/{deps/TEST, redirect, probe}` shape as on the host,
/// because the tests find `redirect` and `probe` from their own path.
const GUEST_TARGET: &str = "redirect/target/debug";

/// Guest memory: the stripped binaries, their libraries and the unpacked
/// archive fit in a quarter of this.
const MEMORY_MIB: u32 = 2048;

/// Guest CPUs: the suite runs two tests at a time, as on a 2-CPU host.
const CPUS: u32 = 2;

/// `REDIRECT_TEST_PATIENCE` in the guest: the tests' waits on `redirect`
/// and `probe` last this many times longer. Under TCG a debug `redirect run`
/// takes 3.5 to 7 s to print `ready` (it parses the kernel's BTF and loads
/// its programs), and 20 s was exceeded with two tests at a time.
const PATIENCE: u32 = 5;

/// A guest still running after this long is killed and the run fails: four
/// times the 7.5 min the suite took in the guest on a loaded 2-CPU host,
/// and well inside CI's 90 min with the host suite.
const TIME_LIMIT: Duration = Duration::from_secs(30 * 60);

/// Runs the suite (tests matching `filter`) on kernel `spec` in a guest.
pub fn run(spec: &str, filter: Option<&str>, ci: bool) -> anyhow::Result<()> {
    toolchain::ensure()?;
    toolchain::ensure_test_tools()?;
    toolchain::ensure_vm_tools()?;
    let target = crate::run::target_dir()?;
    let work = target.join("vm");
    fs::create_dir_all(&work)?;
    let kernel = kernel::resolve(spec, &work.join("kernels"))?;
    eprintln!(
        "xtask: guest kernel {} ({})",
        kernel.release,
        kernel.vmlinuz.display()
    );

    status(cargo().args(["build", "--locked", "--bins"]))?;
    let tests = test_binaries()?;
    let ramfs = initramfs(&kernel, &tests, &target.join("debug"), &work, filter)?;
    let archive = work.join("initramfs.cpio");
    let size = ramfs.write(&archive)?;
    eprintln!(
        "xtask: {} ({} MiB, {} test binaries); booting qemu (TCG, {CPUS} CPUs, {MEMORY_MIB} MiB)",
        archive.display(),
        size >> 20,
        tests.len()
    );

    let outcome = qemu::boot(&qemu::Boot {
        kernel: &kernel.vmlinuz,
        initramfs: &archive,
        memory_mib: MEMORY_MIB,
        cpus: CPUS,
        time_limit: TIME_LIMIT,
    })?;
    let mut totals = Totals::default();
    for line in &outcome.lines {
        totals.add(line);
    }
    println!(
        "summary ({}): {} passed, {} failed, {} skipped; guest ran {} s",
        kernel.release,
        totals.passed,
        totals.failed,
        totals.ignored,
        outcome.elapsed.as_secs()
    );
    match outcome.exit {
        Some(0) => {}
        Some(code) => anyhow::bail!(
            "the suite failed in the {} guest (exit {code})",
            kernel.release
        ),
        None => anyhow::bail!(
            "the {} guest stopped without reporting an exit status (a panic or a failed \
             init: see its console above)",
            kernel.release
        ),
    }
    anyhow::ensure!(totals.failed == 0, "{} test(s) failed", totals.failed);
    if ci {
        anyhow::ensure!(
            totals.ignored == 0,
            "CI=true: {} test(s) were skipped",
            totals.ignored
        );
    }
    Ok(())
}

/// The workspace's test binaries (xtask's own left out), built with
/// `cargo test --no-run`.
fn test_binaries() -> anyhow::Result<Vec<PathBuf>> {
    let out = cargo()
        .args(["test", "--locked", "--no-run", "--message-format=json"])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    anyhow::ensure!(out.status.success(), "cargo test --no-run failed");
    let mut tests = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_test = msg["reason"] == "compiler-artifact" && msg["profile"]["test"] == true;
        let xtask = msg["package_id"]
            .as_str()
            .is_some_and(|id| id.contains("/xtask#"));
        if let (true, false, Some(exe)) = (is_test, xtask, msg["executable"].as_str()) {
            tests.push(PathBuf::from(exe));
        }
    }
    anyhow::ensure!(
        !tests.is_empty(),
        "cargo test --no-run listed no test binary"
    );
    // Cargo reports them in build order; run them in a stable one.
    tests.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(tests)
}

/// The guest's root filesystem.
fn initramfs(
    kernel: &kernel::Kernel,
    tests: &[PathBuf],
    profile_dir: &Path,
    work: &Path,
    filter: Option<&str>,
) -> anyhow::Result<Initramfs> {
    let mut ramfs = Initramfs::default();
    for dir in ["proc", "sys", "dev", "run", "root", "etc"] {
        ramfs.dir(dir, 0o755);
    }
    // std::env::temp_dir(): the tests copy binaries there for `nobody`.
    ramfs.dir("tmp", 0o1777);
    ramfs.data("init", INIT, 0o755);
    ramfs.data(
        "etc/passwd",
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        0o644,
    );
    ramfs.data("etc/group", "root:x:0:\nnogroup:x:65534:\n", 0o644);
    ramfs.data("etc/hosts", "127.0.0.1 localhost\n::1 localhost\n", 0o644);
    ramfs.data("etc/resolv.conf", "nameserver 127.0.0.1\n", 0o644);

    ramfs.executable("bin/busybox", &which("busybox")?)?;
    // init links the other applets; `sh` is there from the start.
    ramfs.symlink("bin/sh", "busybox");
    for tool in GUEST_TOOLS {
        ramfs.executable(&format!("usr/bin/{tool}"), &which(tool)?)?;
    }
    for ko in &kernel.modules {
        let name = ko.file_name().context("module without a name")?;
        ramfs.file(&format!("lib/modules/{}", name.to_string_lossy()), ko)?;
    }

    let stripped = work.join("bin");
    let _ = fs::remove_dir_all(&stripped);
    fs::create_dir_all(&stripped)?;
    for bin in ["redirect", "probe"] {
        let copy = initramfs::stripped(&profile_dir.join(bin), &stripped)?;
        ramfs.executable(&format!("{GUEST_TARGET}/{bin}"), &copy)?;
    }
    let deps = stripped.join("deps");
    fs::create_dir_all(&deps)?;
    let mut names = Vec::new();
    for test in tests {
        let copy = initramfs::stripped(test, &deps)?;
        let name = copy
            .file_name()
            .context("test without a name")?
            .to_string_lossy()
            .into_owned();
        ramfs.executable(&format!("{GUEST_TARGET}/deps/{name}"), &copy)?;
        names.push(name);
    }
    let env = format!(
        "TESTS='{}'\nFILTER={}\nexport REDIRECT_TEST_PATIENCE={PATIENCE}\n",
        names.join(" "),
        shell_quote(filter.unwrap_or(""))
    );
    ramfs.data("etc/redirect-vm.env", env, 0o644);
    Ok(ramfs)
}

/// `s` as one single-quoted shell word.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The first `name` in PATH or the sbin directories.
fn which(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("{name} is not installed on the host (the guest gets a copy)"))
}
