//! Boots the guest under qemu's software emulation (TCG) with its serial
//! console on our stdout, echoes every line, and returns the exit status the
//! guest's init reported. A guest that outlives its time limit is killed.
//!
//! TCG, not KVM: on this machine kind `/dev/kvm` exists but a nested KVM
//! guest hangs at boot.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;

/// The line the guest's init prints last: `REDIRECT-VM-EXIT=0`.
pub const EXIT_MARKER: &str = "REDIRECT-VM-EXIT=";

/// What to boot and how.
pub struct Boot<'a> {
    /// The bzImage.
    pub kernel: &'a Path,
    /// The cpio archive the kernel unpacks as its root.
    pub initramfs: &'a Path,
    /// Guest memory in MiB (the initramfs lives in it, twice while unpacked).
    pub memory_mib: u32,
    /// Guest CPUs.
    pub cpus: u32,
    /// Kill the guest after this long.
    pub time_limit: Duration,
}

/// How the guest ended.
pub struct Outcome {
    /// The status init reported, if it got that far.
    pub exit: Option<i32>,
    /// Every console line, in order.
    pub lines: Vec<String>,
    /// From qemu's start to its exit.
    pub elapsed: Duration,
}

/// Boots, echoes the console, waits for the guest to power off.
pub fn boot(b: &Boot) -> anyhow::Result<Outcome> {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-cpu", "max", "-nographic", "-no-reboot"])
        .args(["-m", &b.memory_mib.to_string()])
        .args(["-smp", &b.cpus.to_string()])
        .arg("-kernel")
        .arg(b.kernel)
        .arg("-initrd")
        .arg(b.initramfs)
        // panic=-1: a panicking guest reboots, which -no-reboot turns into
        // qemu's exit instead of a hang.
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .context("starting qemu-system-x86_64 (package qemu-system-x86)")?;
    let stdout = child.stdout.take().context("qemu stdout")?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            // The serial console ends lines with \r\n and may carry bytes
            // that are not UTF-8 (firmware escapes).
            let line = String::from_utf8_lossy(&line)
                .trim_end_matches('\r')
                .to_owned();
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = start + b.time_limit;
    let mut outcome = Outcome {
        exit: None,
        lines: Vec::new(),
        elapsed: Duration::ZERO,
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                println!("{line}");
                if let Some(code) = line.trim().strip_prefix(EXIT_MARKER) {
                    outcome.exit = code.trim().parse().ok();
                }
                outcome.lines.push(line);
            }
            // qemu closed its stdout: it has exited.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // Our own child, by pid.
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!(
                    "the guest ran past its time limit of {} s and was killed; the last \
                     lines above show where it was",
                    b.time_limit.as_secs()
                );
            }
        }
    }
    let status = child.wait()?;
    outcome.elapsed = start.elapsed();
    if !status.success() {
        eprintln!("xtask: qemu exited with {status}");
    }
    Ok(outcome)
}
