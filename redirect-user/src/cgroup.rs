//! Scopes: finding the cgroup v2 hierarchy, opening a cgroup directory, and
//! creating (then removing) the child cgroups that `redirect exec` runs in.
//!
//! Only cgroup v2 directories can carry the programs: on a hybrid layout
//! (`/sys/fs/cgroup` a tmpfs of v1 controllers, v2 at
//! `/sys/fs/cgroup/unified`) attaching to a v1 directory fails with EBADF,
//! so every directory is checked with `statfs` before anything is loaded.

use std::{
    fs::{self, File},
    io::{self, Write as _},
    os::{fd::AsFd, unix::fs::OpenOptionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::{Error, Result};

/// `CGROUP2_SUPER_MAGIC` from `<linux/magic.h>`.
const CGROUP2_SUPER_MAGIC: u32 = 0x6367_7270;

/// Where redirect mounts cgroup2 when the host has none mounted.
pub const FALLBACK_MOUNT: &str = "/run/redirect/cgroup2";

/// The mount point of the cgroup v2 hierarchy, read from
/// `/proc/self/mountinfo`, or `None` when none is mounted.
pub fn cgroup2_mount() -> Result<Option<PathBuf>> {
    let info = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("reading", "/proc/self/mountinfo", e))?;
    Ok(parse_mountinfo(&info))
}

/// Finds the first cgroup2 mount point in a mountinfo text.
fn parse_mountinfo(info: &str) -> Option<PathBuf> {
    info.lines().find_map(|line| {
        // "36 35 0:30 / /sys/fs/cgroup/unified rw,… shared:9 - cgroup2 cgroup2 rw"
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        let mount_point = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 4 <= bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let digit = |k: usize| u32::from(bytes[i + k] - b'0');
            let v = (digit(1) * 64 + digit(2) * 8 + digit(3)) as u8;
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The root of the cgroup v2 hierarchy; mounts one at [`FALLBACK_MOUNT`] if
/// none is mounted (and logs where).
pub fn cgroup2_root() -> Result<PathBuf> {
    if let Some(root) = cgroup2_mount()? {
        return Ok(root);
    }
    let path = PathBuf::from(FALLBACK_MOUNT);
    mount_cgroup2(&path).map_err(|source| Error::MountCgroup2 {
        path: path.clone(),
        source,
    })?;
    log::warn!(
        "no cgroup v2 hierarchy was mounted; mounted one at {}",
        path.display()
    );
    Ok(path)
}

fn mount_cgroup2(path: &Path) -> io::Result<()> {
    fs::create_dir_all(path)?;
    let target = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: valid NUL-terminated strings; null data is allowed.
    let rc = unsafe {
        libc::mount(
            c"cgroup2".as_ptr(),
            target.as_ptr(),
            c"cgroup2".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The cgroup v2 directory this process belongs to (from
/// `/proc/self/cgroup`), under the mount `root`.
pub fn own_cgroup(root: &Path) -> Result<PathBuf> {
    let text = fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| Error::io("reading", "/proc/self/cgroup", e))?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("/");
    Ok(root.join(rel.trim_start_matches('/')))
}

/// An open cgroup v2 directory: the target programs are attached to.
#[derive(Debug)]
pub struct CgroupDir {
    path: PathBuf,
    dir: File,
}

impl CgroupDir {
    /// Opens `path`, checking that it is a directory of a cgroup2 mount.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let not_cgroup2 = |reason: String| {
            let hint = match cgroup2_mount() {
                Ok(Some(root)) => format!(", such as {}", root.display()),
                _ => String::new(),
            };
            Error::NotCgroup2 {
                path: path.clone(),
                reason,
                hint,
            }
        };
        let dir = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(&path)
            .map_err(|e| not_cgroup2(e.to_string()))?;
        match fs_magic(&dir) {
            Ok(CGROUP2_SUPER_MAGIC) => Ok(CgroupDir { path, dir }),
            Ok(_) => Err(not_cgroup2("it is on another file system".into())),
            Err(e) => Err(not_cgroup2(format!("statfs: {e}"))),
        }
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl AsFd for CgroupDir {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.dir.as_fd()
    }
}

fn fs_magic(f: &File) -> io::Result<u32> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: statfs is plain old data; fstatfs fills it on success.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and pointer.
    if unsafe { libc::fstatfs(f.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // f_type's width differs between libcs; the magic fits in 32 bits.
    Ok(st.f_type as u32)
}

/// A child cgroup created by this process and removed when dropped.
///
/// Removal first kills whatever still runs inside (`cgroup.kill`, falling
/// back to SIGKILL per pid on kernels before 5.14), then waits for the
/// cgroup to empty and removes the directory.
#[derive(Debug)]
pub struct ChildCgroup {
    dir: CgroupDir,
    removed: bool,
    /// The [`EXEC_RECORDS`] file naming this cgroup, removed with it.
    record: Option<PathBuf>,
}

impl ChildCgroup {
    /// Creates `parent/name`; fails if it exists.
    pub fn create(parent: &Path, name: &str) -> Result<Self> {
        let path = parent.join(name);
        fs::create_dir(&path).map_err(|e| Error::io("creating cgroup", &path, e))?;
        match CgroupDir::open(&path) {
            Ok(dir) => Ok(ChildCgroup {
                dir,
                removed: false,
                record: None,
            }),
            Err(e) => {
                let _ = fs::remove_dir(&path);
                Err(e)
            }
        }
    }

    /// The open directory.
    pub fn dir(&self) -> &CgroupDir {
        &self.dir
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Opens `cgroup.procs` for writing: writing a pid (or "0" for the
    /// writer itself) moves that process into this cgroup.
    pub fn procs_writer(&self) -> Result<File> {
        let path = self.path().join("cgroup.procs");
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| Error::io("opening", path, e))
    }

    /// Moves process `pid` into this cgroup.
    pub fn add_pid(&self, pid: u32) -> Result<()> {
        let path = self.path().join("cgroup.procs");
        self.procs_writer()?
            .write_all(pid.to_string().as_bytes())
            .map_err(|e| Error::io("writing", path, e))
    }

    /// Kills what remains inside and removes the directory.
    pub fn remove(mut self) -> Result<()> {
        self.removed = true;
        remove_cgroup(self.path())?;
        self.forget_record();
        Ok(())
    }

    fn forget_record(&mut self) {
        if let Some(record) = self.record.take() {
            let _ = fs::remove_file(record);
        }
    }
}

impl Drop for ChildCgroup {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        match remove_cgroup(self.path()) {
            Ok(()) => self.forget_record(),
            Err(e) => log::warn!("{e}"),
        }
    }
}

/// Where `redirect exec` records the cgroup it runs its command in: one
/// file per exec, named after its pid, holding the cgroup's path and the
/// process's start time. A SIGKILLed exec cannot remove its cgroup; the
/// record lets the next `redirect status`, `run` or `exec` find it, see
/// that its process is gone (a pid reused since has another start time),
/// and remove it ([`remove_stale_exec_cgroups`]).
pub const EXEC_RECORDS: &str = "/run/redirect/exec";

/// The name of the cgroup `redirect exec` with pid `pid` runs its command in.
pub fn exec_cgroup_name(pid: u32) -> String {
    format!("redirect-exec-{pid}")
}

/// Creates this process's exec cgroup, [`exec_cgroup_name`] under
/// `parent`, and records it in [`EXEC_RECORDS`] first, so that it is found
/// and removed even if this process is SIGKILLed.
pub fn create_exec_cgroup(parent: &Path) -> Result<ChildCgroup> {
    let pid = std::process::id();
    let path = parent.join(exec_cgroup_name(pid));
    let start = start_time(pid).ok_or_else(|| {
        Error::io(
            "reading",
            format!("/proc/{pid}/stat"),
            io::ErrorKind::InvalidData.into(),
        )
    })?;
    fs::create_dir_all(EXEC_RECORDS).map_err(|e| Error::io("creating", EXEC_RECORDS, e))?;
    let record = Path::new(EXEC_RECORDS).join(pid.to_string());
    fs::write(&record, format!("{}\n{start}\n", path.display()))
        .map_err(|e| Error::io("writing", &record, e))?;
    match ChildCgroup::create(parent, &exec_cgroup_name(pid)) {
        Ok(mut cgroup) => {
            cgroup.record = Some(record);
            Ok(cgroup)
        }
        Err(e) => {
            let _ = fs::remove_file(&record);
            Err(e)
        }
    }
}

/// Removes the cgroups of `redirect exec` processes that are gone
/// (SIGKILLed, so they could not clean up): kills whatever still runs
/// inside (`cgroup.kill`), removes the directory and its record. Returns
/// the cgroups removed. Needs root; without it (an unprivileged
/// `redirect status`) nothing is removed and nothing is reported.
pub fn remove_stale_exec_cgroups() -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(EXEC_RECORDS) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let record = entry.path();
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(text) = fs::read_to_string(&record) else {
            continue;
        };
        let mut lines = text.lines();
        let (Some(path), Some(start)) = (lines.next(), lines.next()) else {
            continue;
        };
        let path = PathBuf::from(path);
        // Only what exec itself would have made, whatever the file says.
        if path.file_name().and_then(|n| n.to_str()) != Some(exec_cgroup_name(pid).as_str()) {
            continue;
        }
        if start_time(pid).map(|t| t.to_string()).as_deref() == Some(start) {
            continue; // still running
        }
        if !path.exists() {
            let _ = fs::remove_file(&record);
            continue;
        }
        match remove_cgroup(&path) {
            Ok(()) => {
                if fs::remove_file(&record).is_ok() {
                    removed.push(path);
                }
            }
            Err(e) => log::debug!("stale exec cgroup: {e}"),
        }
    }
    removed
}

/// The start time of process `pid` (field 22 of `/proc/PID/stat`, in
/// clock ticks since boot), or `None` when there is no such process.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold anything,
    // so fields are counted from the last ')': state is field 3.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// The pids in cgroup `path`.
pub fn cgroup_pids(path: &Path) -> Result<Vec<i32>> {
    let procs = path.join("cgroup.procs");
    let text = fs::read_to_string(&procs).map_err(|e| Error::io("reading", procs, e))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

fn remove_cgroup(path: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                kill_all(path);
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(Error::io("removing cgroup", path, e)),
        }
    }
}

fn kill_all(path: &Path) {
    if fs::write(path.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    for pid in cgroup_pids(path).unwrap_or_default() {
        // SAFETY: plain syscall; these pids are inside our own child cgroup.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_mountinfo() {
        let info = "\
25 30 0:23 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid shared:5 - cgroup2 cgroup2 rw,nsdelegate
27 25 0:25 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd
";
        assert_eq!(
            parse_mountinfo(info),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn reads_its_own_start_time() {
        let me = start_time(std::process::id()).expect("our own start time");
        assert!(me > 0);
        assert_eq!(start_time(std::process::id()), Some(me));
    }

    #[test]
    fn finds_nothing_without_cgroup2() {
        let info = "25 30 0:23 / /sys/fs/cgroup ro - tmpfs tmpfs ro\n";
        assert_eq!(parse_mountinfo(info), None);
    }

    #[test]
    fn unescapes_mount_points() {
        let info = "26 25 0:24 / /mnt/my\\040cg rw - cgroup2 none rw\n";
        assert_eq!(parse_mountinfo(info), Some(PathBuf::from("/mnt/my cg")));
    }
}
