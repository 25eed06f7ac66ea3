//! Pinned state: the bpffs layout, its version check, and the link calls
//! aya 0.14 lacks (adopting a pinned link, replacing its program in place).
//!
//! Layout under a pin directory (default [`DEFAULT_PIN_DIR`]):
//!
//! ```text
//! <pin_dir>/v1/                     one directory per LAYOUT_VERSION
//!   maps/<MAP>                      the shared program set's maps
//!   scopes/<scope id>/links/<prog>  one cgroup link per hook of the scope
//!   scopes/<scope id>/steer/maps/<MAP>, steer/links/{sockops_listen,steer}
//! ```
//!
//! The pins are the record that a link exists: a loader that finds one
//! adopts it and swaps its program with `BPF_LINK_UPDATE` +
//! `BPF_F_REPLACE` (compare-and-swap), and never attaches a second link
//! for the same hook and scope (a cgroup link always coexists with
//! others, so a second one would run the hook twice).
//!
//! Why raw syscalls: aya 0.14 exposes neither the fd of a pinned link nor
//! `BPF_LINK_UPDATE` for cgroup and netns links, and neither rustix nor
//! nix wraps `bpf(2)`. Each call is a few lines with a `#[repr(C)]` prefix
//! of `union bpf_attr`; the kernel zero-extends a shorter attr.

use std::{
    ffi::CString,
    os::{
        fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use redirect_common::{
    GuardKey, LAYOUT_VERSION, MappingKey, MappingStats, MappingValue, Owner, RevNatKey,
    RevNatValue, Reverse, ScopeCell, ScopePort, SlotCounts, SteerConfig, Target, UdpBind, UdpPeers,
    maps,
};

use crate::{Error, Result};

/// Where the daemon pins its state unless told otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/redirect";

/// `BPF_OBJ_GET`.
const BPF_OBJ_GET: libc::c_long = 7;
/// `BPF_PROG_GET_FD_BY_ID`.
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
/// `BPF_LINK_UPDATE`.
const BPF_LINK_UPDATE: libc::c_long = 29;
/// `BPF_MAP_UPDATE_ELEM`.
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
/// `BPF_OBJ_GET_INFO_BY_FD`.
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
/// `BPF_F_REPLACE`: update only if the link still runs `old_prog_fd`.
const BPF_F_REPLACE: u32 = 4;
/// `BPF_FS_MAGIC` from `<linux/magic.h>`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The versioned directory of a pin directory.
pub fn layout_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(format!("v{LAYOUT_VERSION}"))
}

/// Where the shared map `name` is pinned.
pub fn map_path(pin_dir: &Path, name: &str) -> PathBuf {
    layout_dir(pin_dir).join("maps").join(name)
}

/// The directory of scope `id`.
pub fn scope_dir(pin_dir: &Path, id: u32) -> PathBuf {
    layout_dir(pin_dir).join("scopes").join(id.to_string())
}

/// Makes sure `pin_dir` is on a bpffs, mounting one at `/sys/fs/bpf` when
/// none is mounted there (with a message), and creates the layout
/// directories. Refuses a pin directory holding another layout version.
pub fn prepare(pin_dir: &Path) -> Result<()> {
    let bpffs = Path::new("/sys/fs/bpf");
    if pin_dir.starts_with(bpffs) && !is_bpffs(bpffs) {
        eprintln!("redirect: mounting bpffs at /sys/fs/bpf (pinned state lives there)");
        mount_bpffs(bpffs)?;
    }
    std::fs::create_dir_all(pin_dir).map_err(|e| Error::io("creating", pin_dir, e))?;
    if !is_bpffs(pin_dir) {
        return Err(Error::PinDir {
            path: pin_dir.to_path_buf(),
            reason: "it is not on a bpf file system".into(),
            hint: "mount one (`mount -t bpf bpf /sys/fs/bpf`) or pass a pin directory below it"
                .into(),
        });
    }
    let ours = format!("v{LAYOUT_VERSION}");
    let entries = std::fs::read_dir(pin_dir).map_err(|e| Error::io("reading", pin_dir, e))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('v') && name != ours {
            return Err(Error::PinDir {
                path: pin_dir.to_path_buf(),
                reason: format!(
                    "it holds state of layout {name}, and this redirect uses layout {ours}; \
                     the two cannot be mixed"
                ),
                hint: format!(
                    "stop the other version and remove its state (`redirect reset --pin-dir {}` \
                     with that version), or use another pin directory",
                    pin_dir.display()
                ),
            });
        }
    }
    for dir in ["maps", "scopes"] {
        let dir = layout_dir(pin_dir).join(dir);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("creating", &dir, e))?;
    }
    Ok(())
}

// `f_type` is i64 on x86_64 but another width on other targets.
#[allow(clippy::unnecessary_cast)]
fn is_bpffs(path: &Path) -> bool {
    rustix::fs::statfs(path).is_ok_and(|s| s.f_type as i64 == BPF_FS_MAGIC)
}

fn mount_bpffs(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|e| Error::io("creating", path, e))?;
    rustix::mount::mount("bpf", path, "bpf", rustix::mount::MountFlags::empty(), None)
        .map_err(|e| Error::io("mounting bpffs at", path, e.into()))
}

/// The key and value sizes each shared map must have in this layout; a
/// pinned map that differs was made by another build and is refused
/// rather than reused blindly (aya reuses a pin without checking).
pub fn expected_sizes(name: &str) -> Option<(u32, u32)> {
    use std::mem::size_of;
    let s = |k: usize, v: usize| Some((k as u32, v as u32));
    match name {
        maps::SCOPES => s(size_of::<u64>(), size_of::<u32>()),
        maps::REVERSE => s(size_of::<ScopePort>(), size_of::<Reverse>()),
        maps::TO_PORTS => s(size_of::<u32>(), size_of::<u32>()),
        maps::FROM_PORTS => s(size_of::<u32>(), size_of::<u32>()),
        maps::GLOBAL => s(size_of::<u32>(), size_of::<u32>()),
        maps::LEVELS => s(size_of::<u32>(), size_of::<u32>()),
        maps::MAPPINGS => s(size_of::<MappingKey>(), size_of::<MappingValue>()),
        maps::PORTS => s(size_of::<ScopePort>(), size_of::<u8>()),
        maps::GRANTS => s(size_of::<ScopePort>(), size_of::<u8>()),
        maps::TARGETS => s(size_of::<ScopePort>(), size_of::<Target>()),
        maps::OWNERS => s(size_of::<u32>(), size_of::<Owner>()),
        maps::UDP_BINDS => s(size_of::<ScopePort>(), size_of::<UdpBind>()),
        maps::REV_NAT => s(size_of::<RevNatKey>(), size_of::<RevNatValue>()),
        maps::UDP_PEERS => s(size_of::<u32>(), size_of::<UdpPeers>()),
        maps::STATS => s(size_of::<u32>(), size_of::<MappingStats>()),
        maps::COUNTERS => s(size_of::<u32>(), size_of::<u64>()),
        maps::COUNTS => s(size_of::<u32>(), size_of::<SlotCounts>()),
        maps::LISTENERS => s(size_of::<u32>(), size_of::<u64>()),
        maps::GUARDS => s(size_of::<GuardKey>(), size_of::<u32>()),
        maps::STEER => s(size_of::<u32>(), size_of::<SteerConfig>()),
        maps::SCOPE_CELL => s(size_of::<u64>(), size_of::<ScopeCell>()),
        maps::STEER_CELL => s(size_of::<u32>(), size_of::<ScopeCell>()),
        _ => None,
    }
}

/// Checks a pinned map before it is reused.
pub fn check_pinned_map(path: &Path, name: &str) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let Some((key, value)) = expected_sizes(name) else {
        return Ok(());
    };
    let info = aya::maps::MapInfo::from_pin(path).map_err(|e| Error::PinDir {
        path: path.to_path_buf(),
        reason: format!("cannot read the pinned map: {e}"),
        hint: "remove it with `redirect reset`".into(),
    })?;
    let (k, v) = (info.key_size(), info.value_size());
    // Sockhash values are reported as 4 or 8 bytes depending on the
    // kernel; only the key matters there.
    if k != key || (name != maps::LISTENERS && v != value) {
        return Err(Error::PinDir {
            path: path.to_path_buf(),
            reason: format!(
                "the pinned map {name} has key/value sizes {k}/{v}, this build expects \
                 {key}/{value}: it was made by an incompatible build"
            ),
            hint: "remove the old state with `redirect reset` (it detaches every scope)".into(),
        });
    }
    Ok(())
}

fn bpf(cmd: libc::c_long, attr: *const u8, size: usize) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` points at `size` readable bytes laid out as the
    // prefix of `union bpf_attr` that `cmd` reads.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size) };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Opens the bpffs object pinned at `path` (`BPF_OBJ_GET`).
pub fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
    #[repr(C)]
    struct Attr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let attr = Attr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let fd = bpf(BPF_OBJ_GET, (&raw const attr).cast(), size_of::<Attr>())?;
    // SAFETY: the kernel returned a new fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Opens the loaded program `id` (`BPF_PROG_GET_FD_BY_ID`).
pub fn prog_fd_by_id(id: u32) -> std::io::Result<OwnedFd> {
    #[repr(C)]
    struct Attr {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let attr = Attr {
        id,
        next_id: 0,
        open_flags: 0,
    };
    let fd = bpf(
        BPF_PROG_GET_FD_BY_ID,
        (&raw const attr).cast(),
        size_of::<Attr>(),
    )?;
    // SAFETY: the kernel returned a new fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The ids of the maps program `prog` uses (`BPF_OBJ_GET_INFO_BY_FD`,
/// `nr_map_ids`/`map_ids` of `struct bpf_prog_info`; Linux 4.15).
pub fn prog_map_ids(prog: BorrowedFd<'_>) -> std::io::Result<Vec<u32>> {
    /// Offsets in `struct bpf_prog_info`.
    const NR_MAP_IDS: usize = 52;
    const MAP_IDS: usize = 56;
    let mut ids = vec![0u32; 64];
    // The info up to `map_ids`, 8-byte aligned as the kernel's struct.
    let mut info = [0u64; 8];
    {
        let bytes = info.as_mut_ptr().cast::<u8>();
        // SAFETY: both offsets are inside `info` (64 bytes) and aligned.
        unsafe {
            *bytes.add(NR_MAP_IDS).cast::<u32>() = ids.len() as u32;
            *bytes.add(MAP_IDS).cast::<u64>() = ids.as_mut_ptr() as u64;
        }
    }
    #[repr(C)]
    struct Attr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let attr = Attr {
        bpf_fd: prog.as_raw_fd() as u32,
        info_len: size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf(
        BPF_OBJ_GET_INFO_BY_FD,
        (&raw const attr).cast(),
        size_of::<Attr>(),
    )?;
    // SAFETY: as above; the kernel wrote the program's map count there.
    let n = unsafe { *info.as_ptr().cast::<u8>().add(NR_MAP_IDS).cast::<u32>() } as usize;
    ids.truncate(n.min(ids.len()));
    Ok(ids)
}

/// Writes `value` under `key` in the map `map` (`BPF_MAP_UPDATE_ELEM`,
/// `BPF_ANY`), for map types aya 0.14 has no typed API for (cgroup
/// storage).
pub fn map_update<K, V>(map: BorrowedFd<'_>, key: &K, value: &V) -> std::io::Result<()> {
    #[repr(C)]
    struct Attr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let attr = Attr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: std::ptr::from_ref(key) as u64,
        value: std::ptr::from_ref(value) as u64,
        flags: 0,
    };
    bpf(
        BPF_MAP_UPDATE_ELEM,
        (&raw const attr).cast(),
        size_of::<Attr>(),
    )
    .map(drop)
}

/// Makes the link `link` run `new_prog` instead of `old_prog`, atomically
/// (`BPF_LINK_UPDATE` with `BPF_F_REPLACE`): EPERM if the link no longer
/// runs `old_prog`. Linux 5.7 (cgroup links), 5.9 (netns links).
pub fn link_update(
    link: BorrowedFd<'_>,
    new_prog: BorrowedFd<'_>,
    old_prog: BorrowedFd<'_>,
) -> std::io::Result<()> {
    #[repr(C)]
    struct Attr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let attr = Attr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: new_prog.as_raw_fd() as u32,
        flags: BPF_F_REPLACE,
        old_prog_fd: old_prog.as_raw_fd() as u32,
    };
    bpf(BPF_LINK_UPDATE, (&raw const attr).cast(), size_of::<Attr>()).map(drop)
}

/// A link found pinned: its fd, and the program it runs.
pub struct AdoptedLink {
    /// The link's fd (keeps it open while we work on it).
    pub fd: OwnedFd,
    /// The kernel's id of the link.
    pub id: u32,
    /// The id of the program it runs.
    pub prog_id: u32,
}

/// Opens the link pinned at `path`, if any. A pin whose cgroup or
/// namespace is gone (the link is defunct) is removed and `None` returned,
/// so that the caller creates a fresh link.
pub fn adopt_link(path: &Path) -> Result<Option<AdoptedLink>> {
    if !path.exists() {
        return Ok(None);
    }
    let fd = obj_get(path).map_err(|e| Error::io("opening the pinned link", path, e))?;
    let info = aya::programs::links::PinnedLink::from_pin(path)
        .map(aya::programs::links::FdLink::from)
        .and_then(|l| l.info())
        .map_err(|e| Error::PinDir {
            path: path.to_path_buf(),
            reason: format!("cannot read the pinned link: {e}"),
            hint: "remove it with `redirect reset`".into(),
        })?;
    if info.program_id() == 0 {
        // Detached (its cgroup was removed): forget it.
        let _ = std::fs::remove_file(path);
        return Ok(None);
    }
    Ok(Some(AdoptedLink {
        fd,
        id: info.id(),
        prog_id: info.program_id(),
    }))
}

/// Replaces the program of an adopted link with `prog` in place.
pub fn replace_program(link: &AdoptedLink, prog: BorrowedFd<'_>, path: &Path) -> Result<()> {
    let old = prog_fd_by_id(link.prog_id)
        .map_err(|e| Error::io("opening the old program of", path, e))?;
    link_update(link.fd.as_fd(), prog, old.as_fd()).map_err(|e| {
        Error::io(
            "replacing the program of the pinned link (BPF_LINK_UPDATE)",
            path,
            e,
        )
    })
}

/// Removes every pin of `pin_dir` (all layouts): links go first, so the
/// hooks detach, then maps. Returns how many pins were removed.
pub fn reset(pin_dir: &Path) -> Result<usize> {
    if !pin_dir.exists() {
        return Ok(0);
    }
    let mut removed = 0;
    remove_tree(pin_dir, &mut removed)?;
    Ok(removed)
}

fn remove_tree(dir: &Path, removed: &mut usize) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io("reading", dir, e))?;
    let mut files = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            remove_tree(&path, removed)?;
        } else {
            files.push(path);
        }
    }
    // Links before maps: a directory named "links" sorts before "maps",
    // and within a directory order does not matter.
    for f in files {
        std::fs::remove_file(&f).map_err(|e| Error::io("removing", &f, e))?;
        *removed += 1;
    }
    std::fs::remove_dir(dir).map_err(|e| Error::io("removing", dir, e))
}

/// What is pinned under `pin_dir`, read from the maps themselves, for
/// `redirect status` when no daemon runs (root only: pins are 0600).
/// `None` when nothing is pinned there or it cannot be read.
pub fn pinned_status(pin_dir: &Path) -> Option<serde_json::Value> {
    use aya::maps::{HashMap, Map, MapData, PerCpuHashMap};
    let open = |name: &str| MapData::from_pin(map_path(pin_dir, name)).ok();
    let scopes = HashMap::<_, u64, u32>::try_from(Map::HashMap(open(maps::SCOPES)?)).ok()?;
    let mappings =
        HashMap::<_, MappingKey, MappingValue>::try_from(Map::HashMap(open(maps::MAPPINGS)?))
            .ok()?;
    let stats =
        PerCpuHashMap::<_, u32, MappingStats>::try_from(Map::PerCpuHashMap(open(maps::STATS)?))
            .ok()?;
    let entries: Vec<(MappingKey, MappingValue)> = mappings.iter().filter_map(|r| r.ok()).collect();
    let mut out = Vec::new();
    for (cgroup_id, id) in scopes.iter().filter_map(|r| r.ok()) {
        let mut list = Vec::new();
        for (k, v) in entries.iter().filter(|(k, _)| k.scope == id) {
            let m = super::programs::mapping_of(k, v);
            let mut c = super::MappingCounts::default();
            if let Ok(per_cpu) = stats.get(&v.slot, 0) {
                for s in per_cpu.iter().filter(|s| s.generation == v.generation) {
                    c.connects = c.connects.wrapping_add(s.connects);
                    c.datagrams = c.datagrams.wrapping_add(s.datagrams);
                }
            }
            list.push(crate::status::MappingStatus::new(&m, &c));
        }
        out.push(serde_json::json!({
            "name": format!("#{id}"),
            "id": id,
            "cgroup": format!("cgroup id {cgroup_id}"),
            "mappings": list,
        }));
    }
    Some(serde_json::json!({
        "daemon": { "pin_dir": pin_dir },
        "scopes": out,
    }))
}
