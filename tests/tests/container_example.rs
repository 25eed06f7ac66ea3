//! redirect-user/examples/container_runtime.rs, run: a toy runtime gives two
//! containers (child cgroups and network namespaces it creates) different
//! mappings of the same port, each reaches its own server, and deleting
//! them leaves no cgroup behind.

use std::{path::PathBuf, process::Command};

use redirect_tests::{privileged, redirect::cgroup::cgroup2_root};

/// target/<profile>/examples/container_runtime, next to this test's
/// target/<profile>/deps.
fn example() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("examples/container_runtime");
    assert!(
        path.exists(),
        "{} not found: build it first (`cargo build --examples`; `cargo xtask test` does)",
        path.display()
    );
    path
}

#[test]
fn the_container_runtime_example_runs() {
    if !privileged("container-example") {
        return;
    }
    let out = Command::new(example()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "example failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        r#"web-a: connect 127.0.0.1:443 -> "hello from web-a on 8443""#,
        r#"web-b: connect 127.0.0.1:443 -> "hello from web-b on 9443""#,
        "delete web-a",
        "delete web-b",
    ] {
        assert!(stdout.lines().any(|l| l == line), "{line:?} in\n{stdout}");
    }
    let root = cgroup2_root().unwrap();
    let left: Vec<_> = std::fs::read_dir(root)
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("redirect-example-{}-", out_pid(&stdout)))
        })
        .collect();
    assert!(left.is_empty(), "cgroups left: {left:?}");
}

/// The example's pid, from the cgroup names it printed.
fn out_pid(stdout: &str) -> String {
    stdout
        .split("redirect-example-")
        .nth(1)
        .and_then(|rest| rest.split('-').next())
        .unwrap_or("none")
        .to_owned()
}
