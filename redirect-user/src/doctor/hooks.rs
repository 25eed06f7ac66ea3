//! Tries every hook the project uses for real: loads each program of the
//! embedded object, attaches it to a throwaway child cgroup (sk_lookup to a
//! throwaway network namespace), and detaches it again. This is the only
//! check that accounts for kernel config, backports, LSMs and seccomp.

use std::{fs::File, io, os::fd::AsFd as _};

use aya::{
    Ebpf, EbpfLoader,
    programs::{CgroupAttachMode, CgroupSockAddr, SkLookup, SockOps},
};
use redirect_common::programs;

use crate::cgroup::{ChildCgroup, cgroup2_root};

use crate::ebpf::object;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    SockAddr,
    SockOps,
    CgroupSock,
    SkLookup,
}

/// One program: its name, hook, the first kernel that has it, and what it
/// is for.
struct Hook {
    program: &'static str,
    kind: Kind,
    hook: &'static str,
    min_kernel: &'static str,
    used_for: &'static str,
    /// Without it outbound redirection cannot work at all.
    required: bool,
}

const HOOKS: &[Hook] = &[
    Hook {
        program: programs::CONNECT4,
        kind: Kind::SockAddr,
        hook: "cgroup/connect4",
        min_kernel: "4.17",
        used_for: "rewrites connect() to FROM",
        required: true,
    },
    Hook {
        program: programs::CONNECT6,
        kind: Kind::SockAddr,
        hook: "cgroup/connect6",
        min_kernel: "4.17",
        used_for: "rewrites connect() to FROM over IPv6",
        required: true,
    },
    Hook {
        program: programs::GETPEERNAME4,
        kind: Kind::SockAddr,
        hook: "cgroup/getpeername4",
        min_kernel: "5.8",
        used_for: "getpeername() reports FROM",
        required: true,
    },
    Hook {
        program: programs::GETPEERNAME6,
        kind: Kind::SockAddr,
        hook: "cgroup/getpeername6",
        min_kernel: "5.8",
        used_for: "getpeername() reports FROM over IPv6",
        required: true,
    },
    Hook {
        program: programs::SENDMSG4,
        kind: Kind::SockAddr,
        hook: "cgroup/sendmsg4",
        min_kernel: "4.18",
        used_for: "unconnected UDP sendto()",
        required: true,
    },
    Hook {
        program: programs::SENDMSG6,
        kind: Kind::SockAddr,
        hook: "cgroup/sendmsg6",
        min_kernel: "4.18",
        used_for: "unconnected UDP sendto() over IPv6",
        required: true,
    },
    Hook {
        program: programs::RECVMSG4,
        kind: Kind::SockAddr,
        hook: "cgroup/recvmsg4",
        min_kernel: "5.2",
        used_for: "UDP replies reported from FROM",
        required: true,
    },
    Hook {
        program: programs::RECVMSG6,
        kind: Kind::SockAddr,
        hook: "cgroup/recvmsg6",
        min_kernel: "5.2",
        used_for: "UDP replies reported from FROM over IPv6",
        required: true,
    },
    Hook {
        program: programs::BIND4,
        kind: Kind::SockAddr,
        hook: "cgroup/bind4",
        min_kernel: "5.12",
        used_for: "--grant, --owner and inbound UDP",
        required: false,
    },
    Hook {
        program: programs::BIND6,
        kind: Kind::SockAddr,
        hook: "cgroup/bind6",
        min_kernel: "5.12",
        used_for: "--grant, --owner and inbound UDP over IPv6",
        required: false,
    },
    Hook {
        program: programs::POST_BIND4,
        kind: Kind::CgroupSock,
        hook: "cgroup/post_bind4",
        min_kernel: "6.1 (verified; sk_storage and the caller's uid there)",
        used_for: "--owner with --netns: proving the owner bound a listener",
        required: false,
    },
    Hook {
        program: programs::POST_BIND6,
        kind: Kind::CgroupSock,
        hook: "cgroup/post_bind6",
        min_kernel: "6.1 (verified)",
        used_for: "--owner with --netns, over IPv6",
        required: false,
    },
    Hook {
        program: programs::SOCK_LISTEN,
        kind: Kind::SockOps,
        hook: "sockops (TCP_LISTEN_CB)",
        min_kernel: "5.7",
        used_for: "registering listeners for inbound steering",
        required: false,
    },
    Hook {
        program: programs::STEER,
        kind: Kind::SkLookup,
        hook: "sk_lookup",
        min_kernel: "5.9",
        used_for: "inbound steering (--netns)",
        required: false,
    },
];

/// How one program fared.
pub struct HookResult {
    /// The program's name in the object.
    pub program: &'static str,
    /// The kernel hook.
    pub hook: &'static str,
    /// The first kernel version that has it.
    pub min_kernel: &'static str,
    /// What redirect uses it for.
    pub used_for: &'static str,
    /// Whether outbound redirection needs it.
    pub required_for_connect: bool,
    /// What happened: a sentence when it worked, the error otherwise.
    pub result: Result<String, String>,
}

/// Loads, attaches and detaches every program; never leaves anything
/// attached (the cgroup and namespace are removed, and links are dropped
/// before that).
pub fn try_all() -> Vec<HookResult> {
    let outcome = |h: &Hook, result| HookResult {
        program: h.program,
        hook: h.hook,
        min_kernel: h.min_kernel,
        used_for: h.used_for,
        required_for_connect: h.required,
        result,
    };
    let setup = (|| -> Result<(Ebpf, ChildCgroup, File), String> {
        let root = cgroup2_root().map_err(|e| e.to_string())?;
        let cgroup = ChildCgroup::create(&root, &format!("redirect-doctor-{}", std::process::id()))
            .map_err(|e| e.to_string())?;
        let netns = throwaway_netns().map_err(|e| format!("creating a network namespace: {e}"))?;
        let mut loader = EbpfLoader::new();
        loader.btf(None);
        loader.override_global("AYA_LOG_LEVEL", &0u8, true);
        let ebpf = loader
            .load(object())
            .map_err(|e| format!("loading the object: {e}"))?;
        Ok((ebpf, cgroup, netns))
    })();
    let (mut ebpf, cgroup, netns) = match setup {
        Ok(s) => s,
        Err(e) => return HOOKS.iter().map(|h| outcome(h, Err(e.clone()))).collect(),
    };
    let results = HOOKS
        .iter()
        .map(|h| outcome(h, try_one(&mut ebpf, h, &cgroup, &netns)))
        .collect();
    drop(ebpf);
    if let Err(e) = cgroup.remove() {
        log::warn!("removing the doctor's cgroup: {e}");
    }
    results
}

fn try_one(
    ebpf: &mut Ebpf,
    h: &Hook,
    cgroup: &ChildCgroup,
    netns: &File,
) -> Result<String, String> {
    let program = ebpf
        .program_mut(h.program)
        .ok_or_else(|| format!("the embedded object has no program {}", h.program))?;
    let fail = |what: &str, e: aya::programs::ProgramError| format!("{what}: {e}");
    match h.kind {
        Kind::SockAddr => {
            let p: &mut CgroupSockAddr = program.try_into().map_err(|e| fail("type", e))?;
            p.load().map_err(|e| fail("load", e))?;
            let id = p
                .attach(cgroup.dir().as_fd(), CgroupAttachMode::Single)
                .map_err(|e| fail("attach", e))?;
            p.detach(id).map_err(|e| fail("detach", e))?;
        }
        Kind::SockOps => {
            let p: &mut SockOps = program.try_into().map_err(|e| fail("type", e))?;
            p.load().map_err(|e| fail("load", e))?;
            let id = p
                .attach(cgroup.dir().as_fd(), CgroupAttachMode::Single)
                .map_err(|e| fail("attach", e))?;
            p.detach(id).map_err(|e| fail("detach", e))?;
        }
        Kind::CgroupSock => {
            let p: &mut aya::programs::CgroupSock =
                program.try_into().map_err(|e| fail("type", e))?;
            p.load().map_err(|e| fail("load", e))?;
            let id = p
                .attach(cgroup.dir().as_fd(), CgroupAttachMode::Single)
                .map_err(|e| fail("attach", e))?;
            p.detach(id).map_err(|e| fail("detach", e))?;
        }
        Kind::SkLookup => {
            let p: &mut SkLookup = program.try_into().map_err(|e| fail("type", e))?;
            p.load().map_err(|e| fail("load", e))?;
            let id = p.attach(netns).map_err(|e| fail("attach", e))?;
            p.detach(id).map_err(|e| fail("detach", e))?;
            return Ok("loaded, attached to a throwaway network namespace, detached".into());
        }
    }
    Ok("loaded, attached to a throwaway cgroup, detached".into())
}

/// A new, empty network namespace, held only by the returned file: made
/// by a short-lived thread (unshare affects only the calling thread), so
/// this process stays where it is; it disappears when the file is closed.
fn throwaway_netns() -> io::Result<File> {
    std::thread::spawn(|| {
        // SAFETY: plain syscall; only this thread changes namespace, and it
        // exits right after.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        File::open("/proc/thread-self/ns/net")
    })
    .join()
    .map_err(|_| io::Error::other("namespace thread panicked"))?
}
