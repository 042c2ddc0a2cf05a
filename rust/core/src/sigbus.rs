//! Copies out of a file mapping that survive the file shrinking underneath them.
//!
//! Touching a page of a shared file mapping beyond the file's current end raises SIGBUS,
//! which kills the process by default. [`guarded_copy`] marks the source range of the copy
//! in a thread-local; a process-wide SIGBUS handler that finds the faulting address inside
//! the current thread's range maps an anonymous zero page over the faulting page (so the
//! interrupted copy resumes and completes with zeros) and records the fault, and the copy
//! reports failure. Faults anywhere else go to the handler that was installed before ours
//! (Python's faulthandler, say), or to the default action.

use std::cell::Cell;
use std::mem::MaybeUninit;
use std::sync::atomic::{compiler_fence, AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;

thread_local! {
    // const-initialized, no destructor: plain TLS slots, safe to touch in a signal handler
    static RANGE: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
    static FAULTED: AtomicBool = const { AtomicBool::new(false) };
}

static PAGE: AtomicUsize = AtomicUsize::new(4096);

struct OldAction(libc::sigaction);
// SAFETY: written once before the handler is installed, only read afterwards.
unsafe impl Sync for OldAction {}
// SAFETY: as above.
unsafe impl Send for OldAction {}

static OLD: OnceLock<Option<OldAction>> = OnceLock::new();

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    let (lo, hi) = RANGE.with(|r| r.get());
    if addr >= lo && addr < hi {
        let page = PAGE.load(Ordering::Relaxed);
        let at = addr & !(page - 1);
        // SAFETY: `at` is a page of this thread's current source range, which lies in a
        // read-only file mapping owned by a Shard that outlives the copy; replacing that
        // page with an anonymous read-only zero page only changes what this mapping reads
        // (the shard is poisoned afterwards, so nothing reads it again). mmap is a raw
        // syscall, safe to make from a signal handler.
        let p = unsafe {
            libc::mmap(
                at as *mut libc::c_void,
                page,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            FAULTED.with(|f| f.store(true, Ordering::Relaxed));
            return;
        }
    }
    // Not ours: hand it to whoever had SIGBUS before us.
    match OLD.get() {
        Some(Some(OldAction(old))) => {
            let h = old.sa_sigaction;
            if h == libc::SIG_DFL || h == libc::SIG_IGN {
                // SAFETY: restoring the previous disposition; returning re-executes the
                // faulting instruction, which then gets the default action.
                unsafe { libc::sigaction(libc::SIGBUS, old, std::ptr::null_mut()) };
            } else if old.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: `h` is the previous SA_SIGINFO handler, called as the kernel would.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(h) };
                f(sig, info, ctx);
            } else {
                // SAFETY: `h` is the previous plain handler.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(h) };
                f(sig);
            }
        }
        _ => {
            // SAFETY: an all-zero sigaction is a valid value (SIG_DFL, no flags, empty mask).
            let mut dfl: libc::sigaction = unsafe { MaybeUninit::zeroed().assume_init() };
            dfl.sa_sigaction = libc::SIG_DFL;
            // SAFETY: installs the default action; the fault repeats and gets it.
            unsafe { libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut()) };
        }
    }
}

fn install() -> bool {
    OLD.get_or_init(|| {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if page > 0 {
            PAGE.store(page as usize, Ordering::Relaxed);
        }
        // SAFETY: zeroed sigaction structs are valid starting points; sigaction() fills
        // `old` and installs `new`, whose handler only touches const-initialized TLS,
        // atomics and async-signal-safe syscalls.
        unsafe {
            let mut new: libc::sigaction = MaybeUninit::zeroed().assume_init();
            new.sa_sigaction = on_sigbus as *const () as libc::sighandler_t;
            new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_NODEFER;
            libc::sigemptyset(&mut new.sa_mask);
            let mut old: libc::sigaction = MaybeUninit::zeroed().assume_init();
            if libc::sigaction(libc::SIGBUS, &new, &mut old) != 0 {
                return None;
            }
            Some(OldAction(old))
        }
    })
    .is_some()
}

/// Copies `src` (a range of a file mapping) into `dst`. Returns false if part of `src`
/// lay beyond the end of the file (then `dst` holds zeros there, and the mapping has
/// anonymous pages where the file's were: do not read it again).
pub fn guarded_copy(dst: &mut [u8], src: &[u8]) -> bool {
    if !install() {
        // No handler: the caller's size check is the only protection.
        dst.copy_from_slice(src);
        return true;
    }
    FAULTED.with(|f| f.store(false, Ordering::Relaxed));
    RANGE.with(|r| r.set((src.as_ptr() as usize, src.as_ptr() as usize + src.len())));
    compiler_fence(Ordering::SeqCst);
    dst.copy_from_slice(src);
    compiler_fence(Ordering::SeqCst);
    RANGE.with(|r| r.set((0, 0)));
    !FAULTED.with(|f| f.load(Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_file_truncated_under_a_mapping_is_a_failed_copy_not_a_crash() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&vec![7u8; 64 * 1024]).unwrap();
        // SAFETY: test-only mapping of a private temp file.
        let map = unsafe { memmap2::Mmap::map(&f) }.unwrap();
        let mut dst = vec![1u8; 64 * 1024];
        assert!(guarded_copy(&mut dst, &map[..]));
        assert!(dst.iter().all(|&b| b == 7));
        f.set_len(10_000).unwrap();
        let mut dst = vec![1u8; 64 * 1024];
        assert!(!guarded_copy(&mut dst, &map[..]));
        assert!(
            dst[..8192].iter().all(|&b| b == 7),
            "bytes before the end are copied"
        );
        assert!(dst[16384..].iter().all(|&b| b == 0));
        // and the next copy on this thread starts clean
        let ok = [5u8; 16];
        let mut d = [0u8; 16];
        assert!(guarded_copy(&mut d, &ok));
    }
}
