//! Builds the eBPF object (redirect-ebpf) with aya-build and leaves it in
//! OUT_DIR, where the library embeds it.

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    // The eBPF programs only exist on Linux; elsewhere the library builds
    // without them (the fallback proxy needs none).
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return Ok(());
    }
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
    )
}
