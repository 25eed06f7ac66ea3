//! A tiny writer of the kernel's initramfs format (cpio "newc", uncompressed),
//! and the helpers that fill one: host binaries with the shared libraries
//! `ldd` names, stripped copies of the test binaries.
//!
//! The kernel's unpacker does not create missing parent directories, so
//! every parent of an entry is added as a directory; entries are written in
//! path order, which puts each directory before what it holds.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufWriter, Write},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

/// One entry of the archive.
enum Entry {
    Dir {
        mode: u32,
    },
    /// Contents from a host file.
    File {
        source: PathBuf,
        mode: u32,
    },
    /// Contents given inline.
    Data {
        data: Vec<u8>,
        mode: u32,
    },
    Symlink {
        target: String,
    },
}

/// The files of the guest's root filesystem, by guest path (no leading
/// slash).
#[derive(Default)]
pub struct Initramfs {
    entries: BTreeMap<String, Entry>,
}

impl Initramfs {
    /// A directory (mode 0755 unless given otherwise), and its parents.
    pub fn dir(&mut self, path: &str, mode: u32) {
        let path = path.trim_matches('/').to_owned();
        if path.is_empty() {
            return;
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.parents(parent);
        }
        self.entries.insert(path, Entry::Dir { mode });
    }

    fn parents(&mut self, dir: &str) {
        if !self.entries.contains_key(dir) {
            self.dir(dir, 0o755);
        }
    }

    fn insert(&mut self, path: &str, entry: Entry) {
        let path = path.trim_start_matches('/').to_owned();
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.parents(parent);
        }
        self.entries.insert(path, entry);
    }

    /// A file with the contents of the host file `source` and its mode.
    pub fn file(&mut self, path: &str, source: &Path) -> anyhow::Result<()> {
        let meta = fs::metadata(source).with_context(|| format!("reading {}", source.display()))?;
        let mode = meta.permissions().mode() & 0o7777;
        self.insert(
            path,
            Entry::File {
                source: source.to_owned(),
                mode,
            },
        );
        Ok(())
    }

    /// A file with the given contents and mode.
    pub fn data(&mut self, path: &str, data: impl Into<Vec<u8>>, mode: u32) {
        self.insert(
            path,
            Entry::Data {
                data: data.into(),
                mode,
            },
        );
    }

    /// A symbolic link at `path` pointing to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) {
        self.insert(
            path,
            Entry::Symlink {
                target: target.to_owned(),
            },
        );
    }

    /// An executable at `path` (a copy of the host's `source`), and every
    /// shared library `ldd` says it loads, each at its host path.
    pub fn executable(&mut self, path: &str, source: &Path) -> anyhow::Result<()> {
        self.file(path, source)?;
        for lib in shared_libraries(source)? {
            let guest = lib.display().to_string();
            if !self.entries.contains_key(guest.trim_start_matches('/')) {
                // The library's contents, not the symlink ldd may name.
                self.file(&guest, &lib)?;
            }
        }
        Ok(())
    }

    /// Writes the archive to `out`; returns its size in bytes.
    pub fn write(&self, out: &Path) -> anyhow::Result<u64> {
        let file = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
        let mut w = Writer {
            out: BufWriter::new(file),
            ino: 1,
            written: 0,
        };
        for (path, entry) in &self.entries {
            match entry {
                Entry::Dir { mode } => w.entry(path, 0o040000 | mode, &[])?,
                Entry::Data { data, mode } => w.entry(path, 0o100000 | mode, data)?,
                Entry::File { source, mode } => {
                    let data = fs::read(source)
                        .with_context(|| format!("reading {}", source.display()))?;
                    w.entry(path, 0o100000 | mode, &data)?;
                }
                Entry::Symlink { target } => w.entry(path, 0o120777, target.as_bytes())?,
            }
        }
        w.entry("TRAILER!!!", 0, &[])?;
        w.out.flush()?;
        Ok(w.written)
    }
}

struct Writer {
    out: BufWriter<fs::File>,
    ino: u32,
    written: u64,
}

impl Writer {
    /// One newc record: a 110-byte ASCII header, the name with its NUL, the
    /// data, each padded to 4 bytes.
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) -> anyhow::Result<()> {
        let size = u32::try_from(data.len()).context("file larger than 4 GiB")?;
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let header = format!(
            "070701{:08X}{mode:08X}{:08X}{:08X}{nlink:08X}{:08X}{size:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
            self.ino,
            0, // uid
            0, // gid
            0, // mtime
            0,
            0,
            0,
            0, // dev and rdev major/minor
            name.len() + 1,
            0, // check
        );
        self.ino += 1;
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> anyhow::Result<()> {
        let n = (4 - self.written % 4) % 4;
        self.put(&[0; 3][..n as usize])
    }
}

/// The shared libraries (and the dynamic loader) `ldd` lists for `binary`;
/// none for a static one.
fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd (package libc-bin)")?;
    // ldd fails on a static binary ("not a dynamic executable").
    if !out.status.success() {
        return Ok(Vec::new());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x…)"; the vdso has no path.
        .filter_map(|l| {
            let l = l.split_once("=>").map_or(l, |(_, r)| r).trim();
            l.split_whitespace()
                .next()
                .filter(|p| p.starts_with('/'))
                .map(PathBuf::from)
        })
        .collect())
}

/// A copy of `source` without its debug sections in `dir` (the test
/// binaries shrink about sixfold, and the guest holds them in RAM).
pub fn stripped(source: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    let name = source.file_name().context("binary has no file name")?;
    let out = dir.join(name);
    crate::status(
        Command::new("objcopy")
            .arg("--strip-debug")
            .arg(source)
            .arg(&out),
    )
    .context("stripping a test binary (objcopy is in package binutils)")?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The archive lists parents first and `cpio` reads it back.
    #[test]
    fn cpio_reads_what_is_written() {
        let dir = std::env::temp_dir().join(format!("xtask-cpio-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let mut ramfs = Initramfs::default();
        ramfs.data("etc/passwd", "root:x:0:0::/:/bin/sh\n", 0o644);
        ramfs.symlink("bin/sh", "busybox");
        ramfs.dir("tmp", 0o1777);
        let archive = dir.join("a.cpio");
        let size = ramfs.write(&archive).unwrap();
        assert_eq!(size % 4, 0);
        let names: Vec<&str> = ramfs.entries.keys().map(String::as_str).collect();
        assert_eq!(names, ["bin", "bin/sh", "etc", "etc/passwd", "tmp"]);
        if let Ok(out) = Command::new("cpio")
            .args(["-it", "-F"])
            .arg(&archive)
            .output()
        {
            assert!(out.status.success(), "{out:?}");
            let listed = String::from_utf8_lossy(&out.stdout);
            assert_eq!(listed.lines().collect::<Vec<_>>(), names);
        }
        fs::remove_dir_all(&dir).unwrap();
    }
}
