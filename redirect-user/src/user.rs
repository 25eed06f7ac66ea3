//! Dropping to another user before running a command (`exec --user`).
//!
//! The lookup (`getpwnam_r`, `getgrouplist`) happens before `fork`, since
//! it is not async-signal-safe; [`User::become_user`] only makes the three
//! syscalls that are, so it can run between `fork` and `exec`.

use std::ffi::{CStr, CString};

use crate::MappingError;

/// Makes user and group lookups read `/etc/passwd` and `/etc/group` only,
/// never loading an NSS module. For statically linked binaries (the
/// release `redirect` is static-pie): a static glibc cannot load NSS
/// modules safely, and a name missing from `/etc/passwd` made it load
/// `nss_systemd` and crash. Names from LDAP, SSSD or systemd's dynamic
/// users are then unknown; numeric ids always work. Call it first thing in
/// `main`, before any lookup.
#[cfg(target_env = "gnu")]
pub fn use_files_only() {
    unsafe extern "C" {
        // glibc (nsswitch.c): replaces a database's nsswitch.conf line.
        fn __nss_configure_lookup(
            db: *const std::ffi::c_char,
            service_line: *const std::ffi::c_char,
        ) -> std::ffi::c_int;
    }
    for db in [c"passwd", c"group"] {
        // SAFETY: two NUL-terminated static strings; called before any
        // thread or lookup exists.
        unsafe { __nss_configure_lookup(db.as_ptr(), c"files".as_ptr()) };
    }
}

/// A user to run as: ids, supplementary groups, name and home.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups (from the group database).
    pub groups: Vec<u32>,
    /// Login name.
    pub name: String,
    /// Home directory.
    pub home: String,
}

impl User {
    /// Looks up a user by name, or by number (`65534`), given to `--user`.
    pub fn lookup(name_or_uid: &str) -> Result<User, MappingError> {
        Self::lookup_for(name_or_uid, "--user")
    }

    /// Looks up a user by name or number given to `option` (which an
    /// unknown user's error names).
    pub fn lookup_for(name_or_uid: &str, option: &'static str) -> Result<User, MappingError> {
        let not_found = || MappingError::UnknownUser {
            name: crate::error::clip(name_or_uid),
            option,
        };
        let mut buf = vec![0u8; 16 * 1024];
        // SAFETY: passwd is plain data filled by getpw*_r.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = if let Ok(uid) = name_or_uid.parse::<u32>() {
            // SAFETY: valid pointers and buffer length.
            unsafe {
                libc::getpwuid_r(
                    uid,
                    &mut pwd,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    &mut result,
                )
            }
        } else {
            let name = CString::new(name_or_uid).map_err(|_| not_found())?;
            // SAFETY: as above.
            unsafe {
                libc::getpwnam_r(
                    name.as_ptr(),
                    &mut pwd,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    &mut result,
                )
            }
        };
        if rc != 0 || result.is_null() {
            return Err(not_found());
        }
        // SAFETY: getpw*_r succeeded, so these point into `buf`.
        let (name, home) = unsafe {
            (
                CStr::from_ptr(pwd.pw_name).to_string_lossy().into_owned(),
                CStr::from_ptr(pwd.pw_dir).to_string_lossy().into_owned(),
            )
        };
        let groups = supplementary_groups(&name, pwd.pw_gid);
        Ok(User {
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
            groups,
            name,
            home,
        })
    }

    /// Sets groups, gid, then uid: call only between `fork` and `exec`
    /// (async-signal-safe syscalls only).
    pub fn become_user(&self) -> std::io::Result<()> {
        // SAFETY: plain syscalls with a valid pointer and length.
        unsafe {
            if libc::setgroups(self.groups.len() as _, self.groups.as_ptr()) != 0
                || libc::setgid(self.gid) != 0
                || libc::setuid(self.uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

fn supplementary_groups(name: &str, gid: u32) -> Vec<u32> {
    let Ok(cname) = CString::new(name) else {
        return vec![gid];
    };
    let mut groups = vec![0 as libc::gid_t; 64];
    loop {
        let mut n = groups.len() as libc::c_int;
        // SAFETY: valid pointers; n is the buffer's length.
        // `as _` and `cast`: macOS declares the gids as c_int, Linux as gid_t.
        let rc = unsafe {
            libc::getgrouplist(cname.as_ptr(), gid as _, groups.as_mut_ptr().cast(), &mut n)
        };
        if rc >= 0 {
            groups.truncate(n as usize);
            return groups;
        }
        if groups.len() >= 65536 {
            return vec![gid];
        }
        groups.resize(groups.len() * 4, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_root_by_name_and_number() {
        let root = User::lookup("root").unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert_eq!(User::lookup("0").unwrap().name, "root");
    }

    #[test]
    fn an_unknown_user_is_bad_input() {
        let err = User::lookup("no-such-user-here").unwrap_err();
        assert!(err.to_string().contains("no such user"), "{err}");
    }
}
