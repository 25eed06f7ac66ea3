//! How the library scales with scopes: cold start (load + first scope),
//! adding a scope, adding a mapping, and 1,000 scopes attached at once.
//!
//! ```sh
//! cargo run --release --example scale -- 1000 [STEERED]    # as root
//! ```
//!
//! Creates `redirect-scale-<pid>-<n>` child cgroups of the cgroup v2 root
//! and removes them (and everything attached) before it exits. Then
//! attaches `STEERED` (default 10) more scopes that each steer a network
//! namespace of their own (`ip netns add redirect-scale-<pid>-s<n>`, also
//! removed), 30 ms apart: what a container with inbound mappings costs. Prints one
//! `key=value` line per figure, in µs; `cargo xtask bench` and
//! docs/BENCHMARKS.md use them.

use std::time::{Duration, Instant};

use redirect::{LoadOptions, Mapping, MappingSet, Programs, cgroup};

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(1000);
    let steered: usize = std::env::args()
        .nth(2)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(10);
    let root = cgroup::cgroup2_root()?;
    let dirs: Vec<cgroup::ChildCgroup> = (0..n)
        .map(|i| {
            cgroup::ChildCgroup::create(
                &root,
                &format!("redirect-scale-{}-{i}", std::process::id()),
            )
        })
        .collect::<Result<_, _>>()?;

    let start = Instant::now();
    // As the daemon does: two steering instances kept loaded.
    let programs = Programs::load(&LoadOptions {
        steer_pool: 2,
        ..LoadOptions::default()
    })?;
    let load = start.elapsed();
    let first = programs
        .scope(dirs[0].path())
        .mappings(MappingSet::parse(["443:8443"])?)
        .attach()?;
    let cold = start.elapsed();
    println!("load_us={:.0}", load.as_secs_f64() * 1e6);
    println!("cold_start_us={:.0}", cold.as_secs_f64() * 1e6);

    let mut scopes = vec![first];
    let mut add_scope = Vec::with_capacity(n);
    for dir in &dirs[1..] {
        let t = Instant::now();
        let scope = programs
            .scope(dir.path())
            .mappings(MappingSet::parse(["443:8443"])?)
            .attach()?;
        add_scope.push(t.elapsed());
        scopes.push(scope);
    }
    add_scope.sort_unstable();
    if !add_scope.is_empty() {
        println!("add_scope_p50_us={:.0}", percentile(&add_scope, 0.5));
        println!("add_scope_p99_us={:.0}", percentile(&add_scope, 0.99));
    }
    println!("scopes={}", scopes.len());

    let mut add_mapping = Vec::with_capacity(200);
    for port in 0..200u16 {
        let t = Instant::now();
        scopes[0].add(Mapping::new(10_000 + port, 20_000 + port))?;
        add_mapping.push(t.elapsed());
    }
    add_mapping.sort_unstable();
    println!("add_mapping_p50_us={:.1}", percentile(&add_mapping, 0.5));
    println!("add_mapping_p99_us={:.1}", percentile(&add_mapping, 0.99));

    let status = std::fs::read_to_string("/proc/self/status")?;
    if let Some(rss) = status.lines().find(|l| l.starts_with("VmRSS:")) {
        println!(
            "rss_with_scopes={}",
            rss.trim_start_matches("VmRSS:").trim()
        );
    }

    let mut steer = Vec::with_capacity(steered);
    let mut steer_scopes = Vec::with_capacity(steered);
    let mut namespaces = Vec::with_capacity(steered);
    for i in 0..steered {
        let name = format!("redirect-scale-{}-s{i}", std::process::id());
        let dir = cgroup::ChildCgroup::create(&root, &name)?;
        let ok = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .status()?
            .success();
        if !ok {
            return Err(format!("ip netns add {name} failed").into());
        }
        namespaces.push(name.clone());
        // Containers do not start back to back: give the pool the time
        // a runtime takes to create one (its refill loads ~5-10 ms).
        std::thread::sleep(Duration::from_millis(30));
        let t = Instant::now();
        let scope = programs
            .scope(dir.path())
            .netns(format!("/run/netns/{name}"))
            .mappings(MappingSet::parse(["443:8443/tcp"])?)
            .attach()?;
        steer.push(t.elapsed());
        steer_scopes.push((scope, dir));
    }
    steer.sort_unstable();
    if !steer.is_empty() {
        println!("add_steered_scope_p50_us={:.0}", percentile(&steer, 0.5));
        println!("add_steered_scope_p99_us={:.0}", percentile(&steer, 0.99));
    }
    for (scope, dir) in steer_scopes {
        drop(scope);
        dir.remove()?;
    }
    for name in namespaces {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &name])
            .status();
    }

    let t = Instant::now();
    drop(scopes);
    println!("detach_all_us={:.0}", t.elapsed().as_secs_f64() * 1e6);
    drop(programs);
    for dir in dirs {
        dir.remove()?;
    }
    Ok(())
}
