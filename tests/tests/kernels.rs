//! A kernel that lacks a feature is told so before anything is attached:
//! `REDIRECT_KERNEL_VERSION` makes `redirect` believe it runs an older
//! kernel (it can only lower what the kernel has), so the message an
//! older kernel gets is checked on this one.

use std::process::Command;

use redirect_tests::{attached, binary, privileged, test_cgroup};

/// `redirect ARGS…` as root, believing the kernel is `version`.
fn redirect_on(version: &str, args: &[&str]) -> std::process::Output {
    Command::new(binary("redirect"))
        .args(args)
        .env("REDIRECT_KERNEL_VERSION", version)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run redirect")
}

#[test]
fn grant_on_a_kernel_before_5_12_names_the_feature_and_attaches_nothing() {
    if !privileged("grant_on_a_kernel_before_5_12_names_the_feature_and_attaches_nothing") {
        return;
    }
    let cg = test_cgroup("kernel-grant");
    let dir = cg.path().display().to_string();
    let out = redirect_on("5.10.0", &["run", "--cgroup", &dir, "--grant", "80"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--grant") && err.contains("Linux >= 5.12"),
        "{err}"
    );
    assert!(err.contains("5.10.0"), "names the running kernel: {err}");
    assert!(attached(cg.path()).is_empty(), "nothing attached");
}

#[test]
fn steering_on_a_kernel_before_5_9_names_the_feature() {
    if !privileged("steering_on_a_kernel_before_5_9_names_the_feature") {
        return;
    }
    let cg = test_cgroup("kernel-steer");
    let dir = cg.path().display().to_string();
    let out = redirect_on(
        "5.8.0",
        &[
            "run",
            "--cgroup",
            &dir,
            "--map",
            "1443:18443",
            "--netns",
            "/proc/self/ns/net",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("sk_lookup") && err.contains("Linux >= 5.9"),
        "{err}"
    );
    assert!(attached(cg.path()).is_empty(), "nothing attached");
}

#[test]
fn local_redirection_needs_no_bind_program() {
    if !privileged("local_redirection_needs_no_bind_program") {
        return;
    }
    // A plain local mapping links no bind program: what 5.8 to 5.11 can
    // load (bind4/6 return 3, which they refuse).
    let cg = test_cgroup("kernel-local");
    let mut run = redirect_tests::RedirectProcess::run("1443:18443", cg.path());
    let hooks = attached(cg.path());
    assert!(
        hooks.iter().all(|h| !h.starts_with("bind")),
        "no bind program for a plain mapping: {hooks:?}"
    );
    run.signal(libc::SIGTERM);
    run.wait_exit();
}
