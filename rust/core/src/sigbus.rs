//! Reads out of a file mapping that survive the file shrinking underneath them.
//!
//! Touching a page of a shared file mapping beyond the file's current end raises SIGBUS,
//! which kills the process by default. [`guarded`] marks the source range of the read
//! in a thread-local; a process-wide SIGBUS handler that finds the faulting address inside
//! the current thread's range maps an anonymous zero page over the faulting page (so the
//! interrupted copy resumes and completes with zeros) and records the fault, and the copy
//! reports failure.
//!
//! Other code may install its own SIGBUS handler after ours (Python's `faulthandler.enable()`,
//! which torch's elastic launcher calls), which would silently disable the guard. So before
//! every guarded copy the current handler is checked, and if it is not ours, ours is
//! installed again and the one it replaces becomes the handler to chain to.
//!
//! Faults outside our copies go to that previous handler: ours puts the previous
//! disposition back and returns, so the faulting instruction runs again and faults into the
//! previous handler exactly as the kernel would have delivered it (faulthandler then prints
//! its traceback and re-raises). A SIGBUS sent by a process (`raise`, `kill`) rather than by a
//! fault gets the default action (death by SIGBUS) unless SIGBUS was ignored: calling a
//! previous handler from there could loop, as faulthandler re-raises into whatever handler
//! it finds. The next guarded copy installs the guard again.

use std::cell::Cell;
use std::mem::MaybeUninit;
use std::sync::atomic::{compiler_fence, AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::Mutex;

thread_local! {
    // const-initialized, no destructor: plain TLS slots, safe to touch in a signal handler
    static RANGE: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
    static FAULTED: AtomicBool = const { AtomicBool::new(false) };
}

static PAGE: AtomicUsize = AtomicUsize::new(4096);

/// The disposition ours replaced most recently (null: the default action). Each value is a
/// leaked box: a handler on another thread may be reading the previous one, so none is
/// ever freed (one small struct per re-installation).
static OLD: AtomicPtr<libc::sigaction> = AtomicPtr::new(std::ptr::null_mut());

/// Serializes (re-)installation.
static INSTALL: Mutex<()> = Mutex::new(());

fn handler_address() -> libc::sighandler_t {
    on_sigbus as *const () as libc::sighandler_t
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
    let (addr, code) = unsafe { ((*info).si_addr() as usize, (*info).si_code) };
    let (lo, hi) = RANGE.with(|r| r.get());
    if code > 0 && addr >= lo && addr < hi {
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
    // Not ours: put the previous disposition back.
    let old = OLD.load(Ordering::Acquire);
    // SAFETY: an all-zero sigaction is a valid value (SIG_DFL, no flags, empty mask).
    let mut dfl: libc::sigaction = unsafe { MaybeUninit::zeroed().assume_init() };
    dfl.sa_sigaction = libc::SIG_DFL;
    let prev: *const libc::sigaction = if old.is_null() { &dfl } else { old };
    // SAFETY: `prev` points to a valid sigaction (a leaked box, never freed, or `dfl`);
    // sigaction and raise are async-signal-safe.
    unsafe {
        if code > 0 {
            // A fault: returning re-executes the faulting instruction, which faults again
            // into the previous handler (or gets the default action).
            libc::sigaction(libc::SIGBUS, prev, std::ptr::null_mut());
        } else if (*prev).sa_sigaction != libc::SIG_IGN {
            // Sent by a process: the default action (see the module docs).
            libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
            libc::raise(sig);
        }
    }
}

/// Whether our handler is SIGBUS's disposition now (one syscall, no lock).
fn current_is_ours() -> bool {
    // SAFETY: a zeroed sigaction is valid; a null new action only reads the current one.
    let mut cur: libc::sigaction = unsafe { MaybeUninit::zeroed().assume_init() };
    // SAFETY: as above.
    let rc = unsafe { libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut cur) };
    rc == 0 && cur.sa_sigaction == handler_address()
}

/// Makes ours the process's SIGBUS handler unless it is already; false if that failed.
fn ensure_installed() -> bool {
    if current_is_ours() {
        return true;
    }
    let _guard = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: zeroed sigaction structs are valid starting points; sigaction() with a null
    // new action only reads the current one.
    let mut cur: libc::sigaction = unsafe { MaybeUninit::zeroed().assume_init() };
    // SAFETY: as above.
    if unsafe { libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut cur) } != 0 {
        return false;
    }
    if cur.sa_sigaction == handler_address() {
        return true;
    }
    // SAFETY: sysconf only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if page > 0 {
        PAGE.store(page as usize, Ordering::Relaxed);
    }
    // SAFETY: sigaction() fills `prev` and installs `new`, whose handler only touches
    // const-initialized TLS, atomics and async-signal-safe syscalls.
    unsafe {
        let mut new: libc::sigaction = MaybeUninit::zeroed().assume_init();
        new.sa_sigaction = handler_address();
        new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_NODEFER;
        libc::sigemptyset(&mut new.sa_mask);
        let mut prev: libc::sigaction = MaybeUninit::zeroed().assume_init();
        if libc::sigaction(libc::SIGBUS, &new, &mut prev) != 0 {
            return false;
        }
        // Leaked on purpose (see OLD).
        OLD.store(Box::into_raw(Box::new(prev)), Ordering::Release);
    }
    true
}

/// Runs `f` over `src` (a range of a file mapping) and returns its result, with false if
/// part of `src` lay beyond the end of the file: `f` then read zeros there, and the mapping
/// has anonymous pages where the file's were (do not read it again).
pub fn guarded<R>(src: &[u8], f: impl FnOnce(&[u8]) -> R) -> (R, bool) {
    if !ensure_installed() {
        // No handler: the caller's size checks are the only protection.
        return (f(src), true);
    }
    /// Clears the thread's range however `f` ends (a panic included).
    struct Unmark;
    impl Drop for Unmark {
        fn drop(&mut self) {
            RANGE.with(|r| r.set((0, 0)));
        }
    }
    FAULTED.with(|f| f.store(false, Ordering::Relaxed));
    RANGE.with(|r| r.set((src.as_ptr() as usize, src.as_ptr() as usize + src.len())));
    let unmark = Unmark;
    compiler_fence(Ordering::SeqCst);
    let out = f(src);
    compiler_fence(Ordering::SeqCst);
    drop(unmark);
    (out, !FAULTED.with(|f| f.load(Ordering::Relaxed)))
}

/// Copies `src` (a range of a file mapping) into `dst`: [`guarded`] with a copy.
pub fn guarded_copy(dst: &mut [u8], src: &[u8]) -> bool {
    guarded(src, |s| dst.copy_from_slice(s)).1
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
