//! The guest kernel: a Debian kernel package fetched into target/ (`6.1`), or
//! a bzImage given by path, with the modules the tests need from the same
//! build.
//!
//! A fetched package is cached in the layout of an extracted package
//! (`boot/vmlinuz-REL`, `boot/config-REL`, `lib/modules/REL/…`), so both
//! cases find their config and modules the same way.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use crate::status;

/// Kernel versions `--kernel` can fetch, with the Debian package that
/// depends on the newest build of each (only bookworm's suites are
/// reachable, so 6.1 is the one there is).
const DEBIAN_KERNELS: [(&str, &str); 1] = [("6.1", "linux-image-cloud-amd64")];

/// Modules the suite needs (`NetnsPair` makes a veth pair), with their
/// config symbol: loaded in the guest when the kernel builds them as
/// modules. None of them depends on another module.
const MODULES: [(&str, &str); 1] = [("veth", "CONFIG_VETH")];

/// A kernel to boot.
pub struct Kernel {
    /// The bzImage.
    pub vmlinuz: PathBuf,
    /// Its release (`uname -r` in the guest).
    pub release: String,
    /// Module files to load in the guest, in order.
    pub modules: Vec<PathBuf>,
}

/// Resolves `spec` (a version from [`DEBIAN_KERNELS`], or a path to a
/// bzImage) into a kernel, fetching the package into `cache` if needed.
pub fn resolve(spec: &str, cache: &Path) -> anyhow::Result<Kernel> {
    let vmlinuz = match DEBIAN_KERNELS.iter().find(|(v, _)| *v == spec) {
        Some((version, meta)) => fetch(version, meta, cache)?,
        None if Path::new(spec).is_file() => PathBuf::from(spec),
        None => anyhow::bail!(
            "--kernel {spec}: neither a kernel version this machine can fetch ({}) nor a \
             bzImage file; pass a version or the path of a vmlinuz",
            DEBIAN_KERNELS.map(|(v, _)| v).join(", ")
        ),
    };
    let release = bzimage_release(&vmlinuz)?;
    let modules = modules(&vmlinuz, &release)?;
    Ok(Kernel {
        vmlinuz,
        release,
        modules,
    })
}

/// The vmlinuz of the newest Debian build of `version`, downloaded and
/// extracted into `cache` unless it is there already.
fn fetch(version: &str, meta: &str, cache: &Path) -> anyhow::Result<PathBuf> {
    let package = newest_package(meta)?;
    anyhow::ensure!(
        package.starts_with(&format!("linux-image-{version}.")),
        "{meta} depends on {package}, which is not a {version} kernel"
    );
    let release = package.trim_start_matches("linux-image-");
    let dir = cache.join(&package);
    let vmlinuz = dir.join(format!("boot/vmlinuz-{release}"));
    if vmlinuz.is_file() {
        return Ok(vmlinuz);
    }
    eprintln!(
        "xtask: fetching {package} (the guest kernel) into {}",
        dir.display()
    );
    let tmp = cache.join(format!("{package}.tmp"));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    status(
        Command::new("apt-get")
            .args(["download", &package])
            .current_dir(&tmp),
    )
    .context("downloading the kernel package")?;
    let deb = fs::read_dir(&tmp)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    let tree = tmp.join("tree");
    status(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))?;
    // Keep what the guest needs: the bzImage, its config and the modules
    // it loads (the whole tree is ~300 MB).
    for file in [format!("vmlinuz-{release}"), format!("config-{release}")] {
        copy(
            &tree.join("boot").join(&file),
            &dir.join("boot").join(&file),
        )?;
    }
    let modules = tree.join("lib/modules").join(release);
    for (name, _) in MODULES {
        if let Some(ko) = find_module(&modules, name)? {
            copy(&ko, &dir.join(ko.strip_prefix(&tree)?))?;
        }
    }
    fs::remove_dir_all(&tmp)?;
    Ok(vmlinuz)
}

fn copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(to.parent().context("no parent")?)?;
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

/// The package `meta` depends on (`linux-image-6.1.0-57-cloud-amd64`),
/// from the apt cache; refreshes the package lists once if needed.
fn newest_package(meta: &str) -> anyhow::Result<String> {
    let depends = || -> anyhow::Result<Option<String>> {
        let out = Command::new("apt-cache")
            .args(["depends", "--important", meta])
            .output()
            .context("running apt-cache (a Debian host is needed to fetch kernels)")?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends:"))
            .map(str::trim)
            .find(|p| p.starts_with("linux-image-"))
            .map(str::to_owned))
    };
    if let Some(package) = depends()? {
        return Ok(package);
    }
    eprintln!("xtask: apt-get update (to find the newest {meta})");
    crate::toolchain::apt_update()?;
    depends()?.with_context(|| format!("apt-cache knows no package {meta}"))
}

/// The release string of a bzImage, read from its setup header: the word
/// at 0x20E is the offset (minus 0x200) of "6.1.0-57-cloud-amd64 (…) #1 …".
/// See Documentation/arch/x86/boot.rst, field `kernel_version`.
fn bzimage_release(vmlinuz: &Path) -> anyhow::Result<String> {
    let image = fs::read(vmlinuz).with_context(|| format!("reading {}", vmlinuz.display()))?;
    let not_bzimage = || format!("{} is not an x86 bzImage", vmlinuz.display());
    anyhow::ensure!(image.get(0x202..0x206) == Some(b"HdrS"), not_bzimage());
    let offset = u16::from_le_bytes([image[0x20E], image[0x20F]]) as usize + 0x200;
    let version = image.get(offset..).with_context(not_bzimage)?;
    let end = version
        .iter()
        .position(|&b| b == b' ' || b == 0)
        .with_context(not_bzimage)?;
    Ok(String::from_utf8_lossy(&version[..end]).into_owned())
}

/// The module files of [`MODULES`] that `vmlinuz` needs: found in the
/// `lib/modules/REL` beside it (an extracted package) or the host's, and
/// skipped when its config (`boot/config-REL` beside it or the host's)
/// builds them in.
fn modules(vmlinuz: &Path, release: &str) -> anyhow::Result<Vec<PathBuf>> {
    let boot = vmlinuz.parent().unwrap_or(Path::new("."));
    let root = boot.parent().unwrap_or(Path::new("/"));
    let first = |candidates: [PathBuf; 2]| candidates.into_iter().find(|p| p.exists());
    let config = first([
        boot.join(format!("config-{release}")),
        PathBuf::from(format!("/boot/config-{release}")),
    ])
    .map(fs::read_to_string)
    .transpose()?;
    let module_dir = first([
        root.join("lib/modules").join(release),
        PathBuf::from("/lib/modules").join(release),
    ]);
    let mut found = Vec::new();
    for (name, symbol) in MODULES {
        let setting = config.as_deref().and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix(symbol)?.strip_prefix('='))
        });
        if setting == Some("y") {
            continue;
        }
        match module_dir
            .as_deref()
            .map(|d| find_module(d, name))
            .transpose()?
            .flatten()
        {
            Some(ko) => found.push(ko),
            None if setting == Some("m") => anyhow::bail!(
                "{release} builds {symbol} as a module, but no {name}.ko is under {}: \
                 pass a vmlinuz from an extracted package (boot/ beside lib/modules/)",
                module_dir.map_or("lib/modules".into(), |d| d.display().to_string())
            ),
            None => eprintln!(
                "xtask: warning: no config says whether {release} has {symbol} built in, \
                 and no {name}.ko was found; tests that need it will fail"
            ),
        }
    }
    Ok(found)
}

/// `NAME.ko` anywhere under `dir`.
fn find_module(dir: &Path, name: &str) -> anyhow::Result<Option<PathBuf>> {
    let file = format!("{name}.ko");
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                stack.push(path);
            } else if entry.file_name() == file.as_str() {
                return Ok(Some(path));
            }
        }
    }
    Ok(None)
}
