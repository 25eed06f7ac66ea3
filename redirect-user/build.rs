//! Builds the eBPF object (redirect-ebpf) with aya-build and leaves it in
//! OUT_DIR, where the library embeds it.

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    // `cfg(with_ebpf)`: the eBPF backend is compiled in. The programs only
    // exist on Linux, and only with the `ebpf` feature; elsewhere the
    // library builds without them (the fallback proxy needs none). The
    // target is read from CARGO_CFG_TARGET_OS: `cfg!` here would describe
    // the machine running the build script, not the target.
    println!("cargo::rustc-check-cfg=cfg(with_ebpf)");
    let linux = std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux");
    if !linux || std::env::var_os("CARGO_FEATURE_EBPF").is_none() {
        return Ok(());
    }
    println!("cargo::rustc-cfg=with_ebpf");
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == "redirect-ebpf")
        .ok_or_else(|| anyhow!("redirect-ebpf not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("redirect-ebpf manifest has no parent directory"))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        // aya-build's default asks for nightly, which lacks rust-src on the
        // machines we build on; stable with RUSTC_BOOTSTRAP=1 (set in
        // .cargo/config.toml) does the job.
        aya_build::Toolchain::Custom("stable"),
    )
    .context(
        "building the eBPF programs failed; `cargo xtask test` installs what they need \
         (rust-src, llvm-22-dev, bpf-linker)",
    )?;
    let out_dir = std::env::var_os("OUT_DIR").context("OUT_DIR not set")?;
    strip_debug_info(&std::path::Path::new(&out_dir).join("redirect"));
    Ok(())
}

/// Removes the object's DWARF (`.debug_*`), which nothing reads at run
/// time: aya uses the BTF that bpf-linker made from it (`.BTF`,
/// `.BTF.ext`, kept). 1.5 MB -> ~170 KB, which the library embeds, parses
/// on every load and keeps resident. llvm-objcopy comes with llvm-22, which
/// bpf-linker's llvm-22-dev depends on; without it the object is kept whole.
fn strip_debug_info(object: &std::path::Path) {
    for tool in [
        "llvm-objcopy-22",
        "/usr/lib/llvm-22/bin/llvm-objcopy",
        "llvm-objcopy",
    ] {
        let stripped = std::process::Command::new(tool)
            .arg("--strip-debug")
            .arg(object)
            .status();
        if stripped.is_ok_and(|s| s.success()) {
            return;
        }
    }
    println!(
        "cargo::warning=llvm-objcopy not found: the embedded eBPF object keeps its DWARF \
         (~1.5 MB instead of ~170 KB)"
    );
}
