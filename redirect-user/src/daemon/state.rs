//! The runtime scopes' store: one JSON file per scope in `scopes.d/`
//! beside the control socket (in /run, so cleared at reboot like bpffs).
//!
//! Runtime scopes (the OCI hook's, `add_scope` on the control socket) must
//! survive a daemon restart: at start the daemon re-attaches what the store
//! names and removes pinned scopes it does not. The daemon answers an
//! `add_scope` only once the scope's file is written.
//!
//! Why a file per scope rather than one file for all: adding a scope then
//! writes one small file under a new name, which costs ~90 µs on ext4,
//! while rewriting a shared file means a rename over the old one, which
//! ext4 (`auto_da_alloc`) turns into a flush of the new data: ~400 µs, on
//! every container start, growing with the number of scopes. The single
//! `scopes.json` of earlier versions is still read, and removed by the
//! first [`RuntimeStore::sync`].

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use crate::control::ScopeSpec;

/// Where the runtime scopes are kept, and how.
#[derive(Clone, Debug)]
pub struct RuntimeStore {
    dir: PathBuf,
    legacy: PathBuf,
}

impl RuntimeStore {
    /// The store beside the control socket `control`.
    pub fn new(control: &Path) -> Self {
        RuntimeStore {
            dir: control.with_file_name("scopes.d"),
            legacy: control.with_file_name("scopes.json"),
        }
    }

    /// Every saved scope: those of an earlier version's `scopes.json`, then
    /// the directory's (which win on a name in both). Unreadable files are
    /// logged and skipped.
    pub fn load(&self) -> Vec<ScopeSpec> {
        let mut specs: Vec<ScopeSpec> = match fs::read_to_string(&self.legacy) {
            Ok(text) => serde_json::from_str(&text).unwrap_or_else(|e| {
                log::warn!("ignoring {}: {e}", self.legacy.display());
                Vec::new()
            }),
            Err(_) => Vec::new(),
        };
        for path in self.files() {
            let parsed = fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|t| serde_json::from_str::<ScopeSpec>(&t).map_err(|e| e.to_string()));
            match parsed {
                Ok(spec) => {
                    specs.retain(|s| s.name() != spec.name());
                    specs.push(spec);
                }
                Err(e) => log::warn!("ignoring {}: {e}", path.display()),
            }
        }
        specs
    }

    /// Saves one scope, atomically (a temporary file renamed into place):
    /// a crash never leaves half a file.
    pub fn save(&self, spec: &ScopeSpec) {
        if let Err(e) = self.write(spec) {
            log::warn!("saving runtime scope {}: {e}", spec.name());
        }
    }

    /// Forgets one scope.
    pub fn forget(&self, name: &str) {
        match fs::remove_file(self.path_of(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("forgetting runtime scope {name}: {e}"),
        }
    }

    /// Makes the store hold exactly `specs`: each saved (only when its
    /// file differs), every other file and the old `scopes.json` removed.
    pub fn sync<'a>(&self, specs: impl IntoIterator<Item = &'a ScopeSpec>) {
        let mut keep = Vec::new();
        for spec in specs {
            let path = self.path_of(&spec.name());
            let same = serde_json::to_vec_pretty(spec)
                .is_ok_and(|new| fs::read(&path).is_ok_and(|old| old == new));
            if !same {
                self.save(spec);
            }
            keep.push(path);
        }
        for path in self.files() {
            if !keep.contains(&path)
                && let Err(e) = fs::remove_file(&path)
            {
                log::warn!("removing {}: {e}", path.display());
            }
        }
        match fs::remove_file(&self.legacy) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("removing {}: {e}", self.legacy.display()),
        }
    }

    /// Removes the whole store (`redirect reset`).
    pub fn remove_all(&self) -> io::Result<()> {
        for r in [fs::remove_dir_all(&self.dir), fs::remove_file(&self.legacy)] {
            match r {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    fn write(&self, spec: &ScopeSpec) -> io::Result<()> {
        let path = self.path_of(&spec.name());
        let tmp = self.dir.join(format!(
            ".{}.tmp",
            path.file_name().unwrap_or_default().to_string_lossy()
        ));
        let text = serde_json::to_vec_pretty(spec)?;
        if let Err(e) = fs::write(&tmp, &text) {
            if e.kind() != io::ErrorKind::NotFound {
                return Err(e);
            }
            fs::create_dir_all(&self.dir)?;
            fs::write(&tmp, &text)?;
        }
        fs::rename(&tmp, &path)
    }

    /// The scope files (`*.json`) in the directory.
    fn files(&self) -> Vec<PathBuf> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.extension().is_some_and(|x| x == "json")
                    && !p
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect();
        files.sort();
        files
    }

    fn path_of(&self, name: &str) -> PathBuf {
        self.dir.join(file_name(name))
    }
}

/// A scope name as a file name: bytes other than ASCII letters, digits,
/// `-` and `_` are written `%XX`, so no name can reach outside the
/// directory or collide with another's file.
fn file_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 5);
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out.push_str(".json");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, cgroup: &str) -> ScopeSpec {
        ScopeSpec {
            name: Some(name.into()),
            cgroup: cgroup.into(),
            maps: vec!["443:8443".into()],
            ..ScopeSpec::default()
        }
    }

    /// A directory of the test's own, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn store(test: &str) -> (TempDir, RuntimeStore) {
        let dir =
            std::env::temp_dir().join(format!("redirect-state-{}-{test}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("temp dir");
        let store = RuntimeStore::new(&dir.join("control.sock"));
        (TempDir(dir), store)
    }

    #[test]
    fn names_become_safe_distinct_file_names() {
        assert_eq!(file_name("oci-abc_1"), "oci-abc_1.json");
        assert_eq!(file_name("../x"), "%2E%2E%2Fx.json");
        assert_eq!(file_name("a/b"), "a%2Fb.json");
        assert_ne!(file_name("a/b"), file_name("a%2Fb"));
    }

    #[test]
    fn saved_scopes_load_back_and_forgotten_ones_do_not() {
        let (_dir, store) = store("roundtrip");
        assert!(store.load().is_empty());
        store.save(&spec("oci-a", "/cg/a"));
        store.save(&spec("x/y", "/cg/b"));
        let mut names: Vec<String> = store.load().iter().map(ScopeSpec::name).collect();
        names.sort();
        assert_eq!(names, ["oci-a", "x/y"]);
        store.forget("oci-a");
        store.forget("never-saved");
        assert_eq!(store.load(), vec![spec("x/y", "/cg/b")]);
    }

    #[test]
    fn an_earlier_versions_scopes_json_is_read_then_replaced() {
        let (dir, store) = store("legacy");
        let legacy = dir.path().join("scopes.json");
        let old = vec![spec("oci-old", "/cg/old"), spec("oci-both", "/cg/stale")];
        fs::write(&legacy, serde_json::to_vec(&old).expect("json")).expect("write");
        store.save(&spec("oci-both", "/cg/new"));
        let loaded = store.load();
        assert_eq!(loaded.len(), 2);
        assert!(loaded.contains(&spec("oci-old", "/cg/old")));
        assert!(loaded.contains(&spec("oci-both", "/cg/new")));
        store.sync(&loaded[..1]);
        assert!(!legacy.exists());
        assert_eq!(store.load(), loaded[..1].to_vec());
        store.remove_all().expect("remove");
        assert!(store.load().is_empty());
        store.remove_all().expect("idempotent");
    }
}
