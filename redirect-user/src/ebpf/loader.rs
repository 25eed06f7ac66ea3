//! An aya loader that does not parse the kernel's BTF.
//!
//! aya 0.14's `EbpfLoader::new()` reads and parses `/sys/kernel/btf/vmlinux`
//! (5.5 MB on Linux 6.18: 25–30 ms on the development VM, the largest part
//! of a cold start) even when the caller then turns BTF relocation off with
//! `btf(None)`, and it has no other constructor. These programs use no
//! CO-RE relocation, so the parse is wasted work. Until aya has a
//! constructor without it, the loader is built on a short-lived thread
//! whose private mount namespace hides `/sys/kernel/btf` behind an empty
//! tmpfs: the read fails at once and aya carries on without kernel BTF, as
//! `btf(None)` asks anyway. The thread's namespace dies with it; nothing on
//! the host changes. Where the thread cannot do that (no CAP_SYS_ADMIN, a
//! kernel without mount namespaces) the loader is built the ordinary way,
//! and only the time is lost.

use aya::EbpfLoader;

/// A loader with kernel BTF off, built without parsing it when possible.
pub(super) fn without_kernel_btf() -> EbpfLoader<'static> {
    let quick = std::thread::Builder::new()
        .name("redirect-loader".into())
        .spawn(|| hide_kernel_btf().ok().map(|()| EbpfLoader::new()))
        .ok()
        .and_then(|t| t.join().ok())
        .flatten();
    let mut loader = quick.unwrap_or_else(|| {
        log::debug!("parsing the kernel's BTF: it could not be hidden from aya's loader");
        EbpfLoader::new()
    });
    loader.btf(None);
    loader
}

/// Gives the calling thread a private mount namespace in which
/// `/sys/kernel/btf` is an empty directory.
fn hide_kernel_btf() -> rustix::io::Result<()> {
    use rustix::mount::{MountFlags, MountPropagationFlags, mount, mount_change};
    use rustix::thread::{UnshareFlags, unshare_unsafe};
    // SAFETY: FS and NEWNS only: this thread's root, cwd and mounts; no
    // file descriptor table is unshared.
    unsafe { unshare_unsafe(UnshareFlags::FS | UnshareFlags::NEWNS) }?;
    // Private, so that the mount below never propagates to the host.
    mount_change(
        "/",
        MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
    )?;
    mount(
        "redirect",
        "/sys/kernel/btf",
        "tmpfs",
        MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        None,
    )
}
