//! Reading back, from the pinned state alone, what each pinned scope is:
//! its cgroup, network namespace, owner, mappings and grants, so that
//! [`Programs::open_pinned`](super::Programs::open_pinned) can adopt every
//! scope a previous process left, without being told what they were.
//!
//! The pins hold ids, not paths: a cgroup is found again by its id (the
//! inode of its directory) under the cgroup v2 root, and a steered network
//! namespace by its cookie, among `/run/netns/*` and the processes'
//! `/proc/PID/ns/net`.

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// The cgroup v2 directory below `root` whose inode is `id`, searched
/// breadth-first (scopes sit near the root).
pub(super) fn cgroup_by_id(root: &Path, id: u64) -> Option<PathBuf> {
    let mut queue = std::collections::VecDeque::from([root.to_path_buf()]);
    while let Some(dir) = queue.pop_front() {
        if std::fs::metadata(&dir).is_ok_and(|m| m.ino() == id) {
            return Some(dir);
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                queue.push_back(e.path());
            }
        }
    }
    None
}

/// A path naming the network namespace whose cookie is `cookie`: a
/// `/run/netns` entry if one does, else some process's `/proc/PID/ns/net`.
pub(super) fn netns_by_cookie(cookie: u64) -> Option<PathBuf> {
    let named = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path());
    let processes = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .map(|e| e.path().join("ns/net"));
    let mut seen = std::collections::HashSet::new();
    named.chain(processes).find(|path| {
        // One cookie query per namespace, not per process.
        let Ok(ino) = std::fs::metadata(path).map(|m| m.ino()) else {
            return false;
        };
        seen.insert(ino) && super::netns_cookie(path).is_ok_and(|c| c == cookie)
    })
}
