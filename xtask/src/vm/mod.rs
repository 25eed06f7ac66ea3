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
/// (`runc` is for tests/oci.rs, which builds its containers' rootfs from
/// the same static busybox.)
const GUEST_TOOLS: [&str; 7] = [
    "ip", "dig", "dnsmasq", "findmnt", "unshare", "setpriv", "runc",
];

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

/// A guest still running after this long is killed and the run fails. The
/// suite took 7 min in the guest on an otherwise idle 2-CPU machine and
/// about 30 min when other builds kept the load at 15; 45 min still leaves
/// CI's 90 min for the host suite and the build (~10 min).
const TIME_LIMIT: Duration = Duration::from_secs(45 * 60);

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

    // The tests run the binaries and the examples too.
    status(cargo().args(["build", "--locked", "--bins", "--examples"]))?;
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

/// Test files that run on the host only, each with why.
///
/// - `proxy`: the userspace fallback proxy (sockets and splice only). Its
///   peers, nginx and haproxy, are not packed into the guest, and its
///   1,000-connection and timing tests are beyond a TCG guest. It runs on
///   the host and again without the eBPF backend (`cargo xtask portable`).
/// - `upgrade`: needs the second build of the eBPF object, which is not
///   packed into the guest. What it exercises in the kernel,
///   `BPF_LINK_UPDATE` on cgroup links (Linux 5.7), the guest's daemon
///   tests exercise too: every restart replaces the programs behind the
///   pinned links (`daemon::a_restart_replaces_the_programs_behind_the_same_links`).
const HOST_ONLY: [&str; 2] = ["proxy", "upgrade"];

/// The workspace's test binaries (xtask's own and [`HOST_ONLY`] left
/// out), built with `cargo test --no-run`.
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
        let host_only = msg["target"]["name"]
            .as_str()
            .is_some_and(|name| HOST_ONLY.contains(&name));
        if let (true, false, false, Some(exe)) =
            (is_test, xtask, host_only, msg["executable"].as_str())
        {
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
    // The library's container_runtime example is run by
    // tests/container_example.rs from target/<profile>/examples.
    for bin in ["redirect", "probe", "examples/container_runtime"] {
        let copy = initramfs::stripped(&profile_dir.join(bin), &stripped)?;
        ramfs.executable(&format!("{GUEST_TARGET}/{bin}"), &copy)?;
    }
    let examples = stripped.join("examples");
    fs::create_dir_all(&examples)?;
    for example in built_examples(&profile_dir.join("examples"))? {
        let copy = initramfs::stripped(&example, &examples)?;
        let name = copy.file_name().context("example without a name")?;
        ramfs.executable(
            &format!("{GUEST_TARGET}/examples/{}", name.to_string_lossy()),
            &copy,
        )?;
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

/// The example binaries in `dir` (target/<profile>/examples), without
/// cargo's hashed copies (`NAME-0123456789abcdef`) and `.d` files.
fn built_examples(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(Vec::new());
    };
    let mut found = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let hashed = name
            .rsplit_once('-')
            .is_some_and(|(_, h)| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()));
        if path.is_file() && !hashed && !name.contains('.') {
            found.push(path);
        }
    }
    Ok(found)
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
