//! The few bpf(2) commands aya does not expose: walking the kernel's BTF objects and links by
//! id and reading their info.

use std::os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};

// bpf(2) commands (uapi `enum bpf_cmd`; libc does not carry them).
pub const BPF_OBJ_GET_INFO_BY_FD: libc::c_int = 15;
const BPF_BTF_GET_FD_BY_ID: libc::c_int = 19;
const BPF_BTF_GET_NEXT_ID: libc::c_int = 23;
const BPF_LINK_GET_FD_BY_ID: libc::c_int = 30;
const BPF_LINK_GET_NEXT_ID: libc::c_int = 31;

/// The kinds of kernel object walked by id here.
#[derive(Clone, Copy, Debug)]
pub enum Object {
    Btf,
    Link,
}

impl Object {
    fn commands(self) -> (libc::c_int, libc::c_int) {
        match self {
            Object::Btf => (BPF_BTF_GET_NEXT_ID, BPF_BTF_GET_FD_BY_ID),
            Object::Link => (BPF_LINK_GET_NEXT_ID, BPF_LINK_GET_FD_BY_ID),
        }
    }
}

/// `union bpf_attr` as the `*_GET_NEXT_ID` / `*_GET_FD_BY_ID` commands read it.
#[repr(C)]
#[derive(Default)]
struct IdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

/// `union bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
struct InfoAttr {
    fd: u32,
    info_len: u32,
    info: u64,
}

/// bpf(2) with `attr` as the command's prefix of `union bpf_attr` (a `#[repr(C)]` struct
/// with no padding, since the kernel rejects non-zero bytes it does not know). `attr` is
/// mutable: the kernel writes results into it (`next_id`).
pub fn bpf<T>(cmd: libc::c_int, attr: &mut T) -> std::io::Result<i32> {
    // SAFETY: attr is a live, fully initialised prefix of `union bpf_attr` of the given size.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r as i32)
}

/// A bpf(2) command that returns a new file descriptor.
pub fn bpf_fd<T>(cmd: libc::c_int, attr: &mut T) -> std::io::Result<OwnedFd> {
    let fd = bpf(cmd, attr)?;
    // SAFETY: the kernel returned a new fd that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Every id of this kind the kernel has now, in order.
pub fn ids(kind: Object) -> std::io::Result<Vec<u32>> {
    let mut attr = IdAttr::default();
    let mut all = Vec::new();
    loop {
        match bpf(kind.commands().0, &mut attr) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(all),
            Err(e) => return Err(e),
        }
        attr.id = attr.next_id;
        all.push(attr.id);
    }
}

/// A file descriptor for the object of this kind with this id.
pub fn fd_by_id(kind: Object, id: u32) -> std::io::Result<OwnedFd> {
    let mut attr = IdAttr {
        id,
        ..Default::default()
    };
    bpf_fd(kind.commands().1, &mut attr)
}

/// Fills `info` (a `#[repr(C)]` prefix of the object's `struct bpf_*_info`, zeroed but for
/// its in/out pointers) from the object behind `fd`. The kernel writes what it knows of it
/// and leaves the rest.
pub fn info<T>(fd: BorrowedFd<'_>, info: &mut T) -> std::io::Result<()> {
    let mut get = InfoAttr {
        fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<T>() as u32,
        info: info as *mut T as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut get).map(drop)
}
