//! Error codes: negative, errno-style values in RAX after a hypercall.

use core::fmt;

/// A hypercall error. On the wire it is the negative value in RAX.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(pub i64);

macro_rules! errnos {
    ($($name:ident = $val:literal, $text:literal;)*) => {
        impl Errno {
            $(#[doc = $text] pub const $name: Errno = Errno(-$val);)*

            /// Short name, e.g. `"EINVAL"`.
            pub fn name(self) -> &'static str {
                match -self.0 { $($val => stringify!($name),)* _ => "E?" }
            }

            /// What it means, in words.
            pub fn text(self) -> &'static str {
                match -self.0 { $($val => $text,)* _ => "unknown error" }
            }

            /// Every defined error code (for the generated ABI document).
            pub const ALL: &'static [Errno] = &[$(Errno::$name),*];
        }
    };
}

errnos! {
    EPERM = 1, "operation not permitted (e.g. privileged hypercall from a DomU)";
    ENOENT = 2, "no such entry";
    ESRCH = 3, "no such domain";
    EIO = 5, "I/O error";
    E2BIG = 7, "too many items in one request";
    EBADF = 9, "bad port or handle";
    EAGAIN = 11, "try again";
    ENOMEM = 12, "out of memory, or over the domain's memory limit";
    EACCES = 13, "access denied by a grant or frame type";
    EFAULT = 14, "bad guest address: unmapped, not writable, or overflowing";
    EBUSY = 16, "resource in use (e.g. frame still mapped or pinned)";
    EEXIST = 17, "already exists or already bound";
    EINVAL = 22, "invalid argument";
    ENOSPC = 28, "no free slot";
    ERANGE = 34, "value out of range";
    ENOSYS = 38, "unknown hypercall, or not available to this guest kind";
    EOPNOTSUPP = 95, "operation not supported";
    ETIMEDOUT = 110, "timed out";
}

impl Errno {
    /// Decodes a hypercall return value.
    pub fn result(raw: i64) -> Result<u64, Errno> {
        if raw < 0 {
            Err(Errno(raw))
        } else {
            Ok(raw as u64)
        }
    }

    /// Encodes a handler's result as the RAX value.
    pub fn encode(r: Result<u64, Errno>) -> i64 {
        match r {
            Ok(v) => v.min(i64::MAX as u64) as i64,
            Err(e) => e.0,
        }
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name(), self.0)
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.text())
    }
}
