//! One open shard file: its validated header, its size at open, and reads that turn a file
//! shrunk or rewritten under us into an error instead of a SIGBUS.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use memmap2::Mmap;

use crate::error::{Error, Result};
use crate::header::{read_header, Header};
use crate::sigbus;

/// How the reader copies bytes out of a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadMethod {
    /// `pread` into the destination: a file that shrank gives a short read, hence an error.
    Pread,
    /// `memcpy` out of a shared mapping (faster: no kernel copy, no page-table growth,
    /// since read pages are dropped from the mapping afterwards). The file's size is checked
    /// before and after each piece, and a file that shrinks during a copy is caught by a
    /// SIGBUS handler ([`crate::sigbus`]) or by the check after it, and reported as an
    /// error. The default.
    #[default]
    Mmap,
    /// `O_DIRECT` reads of whole aligned blocks, copied out of a per-thread aligned buffer:
    /// no page cache on the way, for files that are not cached (a cold load); many threads
    /// keep the disk's queue deep. Where the file system refuses `O_DIRECT` (tmpfs), `pread`.
    Direct,
}

/// Alignment of `O_DIRECT` offsets, lengths and buffers (the largest logical block size).
const DIRECT_ALIGN: usize = 4096;
/// The most bytes of one `O_DIRECT` read.
const DIRECT_BLOCK: usize = 4 << 20;

/// A per-thread buffer aligned for `O_DIRECT`.
struct AlignedBuf {
    ptr: *mut u8,
    cap: usize,
}

impl AlignedBuf {
    const fn empty() -> AlignedBuf {
        AlignedBuf {
            ptr: std::ptr::null_mut(),
            cap: 0,
        }
    }

    /// At least `len` bytes (`len` > 0, a multiple of [`DIRECT_ALIGN`]).
    fn get(&mut self, len: usize) -> &mut [u8] {
        if self.cap < len {
            self.free();
            let layout =
                std::alloc::Layout::from_size_align(len, DIRECT_ALIGN).expect("a valid layout");
            // SAFETY: the layout has a nonzero size.
            let ptr = unsafe { std::alloc::alloc(layout) };
            if ptr.is_null() {
                std::alloc::handle_alloc_error(layout);
            }
            self.ptr = ptr;
            self.cap = len;
        }
        // SAFETY: `ptr` is a live allocation of `cap >= len` bytes owned by this buffer, and
        // the returned borrow of `self` keeps anyone else from using it meanwhile. The bytes
        // may be uninitialized for u8 purposes only until the read fills them; callers only
        // read what the kernel wrote.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len) }
    }

    fn free(&mut self) {
        if !self.ptr.is_null() {
            let layout = std::alloc::Layout::from_size_align(self.cap, DIRECT_ALIGN)
                .expect("a valid layout");
            // SAFETY: `ptr` was allocated by `get` with exactly this layout and is freed once.
            unsafe { std::alloc::dealloc(self.ptr, layout) };
            self.ptr = std::ptr::null_mut();
            self.cap = 0;
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        self.free();
    }
}

thread_local! {
    static DIRECT_BUF: std::cell::RefCell<AlignedBuf> = const { std::cell::RefCell::new(AlignedBuf::empty()) };
}

/// Linux 5.14+: fault a range in with one call instead of a fault per page.
const MADV_POPULATE_READ: libc::c_int = 22;

/// Best-effort madvise over the pages covering `range` of a read-only file mapping.
fn advise(range: &[u8], advice: libc::c_int) {
    if range.is_empty() {
        return;
    }
    // SAFETY: sysconf has no preconditions.
    // SAFETY: sysconf only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    let start = range.as_ptr() as usize & !(page - 1);
    let end = range.as_ptr() as usize + range.len();
    // SAFETY: [start, end) lies within our own shared, read-only file mapping (the mapping
    // starts page-aligned and covers `range`). POPULATE_READ only faults pages in;
    // DONTNEED on a file mapping only drops page-table entries, and a later access faults
    // the unchanged file pages back in, so a concurrent reader of a shared boundary page
    // still reads the right bytes. Errors (old kernels) are ignored: both are hints.
    unsafe {
        libc::madvise(start as *mut libc::c_void, end - start, advice);
    }
}

#[derive(Debug)]
pub struct Shard {
    pub path: PathBuf,
    pub size: u64,
    pub header: Header,
    file: File,
    map: OnceLock<std::result::Result<Mmap, String>>,
    /// The same file opened with `O_DIRECT`, on first use (None: the file system refuses it).
    direct: OnceLock<Option<File>>,
    /// Set once a copy out of the mapping faulted: the mapping now holds zero pages.
    poisoned: AtomicBool,
}

impl Shard {
    /// Opens `path`, records its size and validates its header.
    pub fn open(path: &Path) -> Result<Shard> {
        // O_NONBLOCK: open() on a FIFO would otherwise wait for a writer (even one swapped in
        // after a metadata check); it is refused just below. Regular files ignore the flag.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| Error::io(path, "opening", e))?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io(path, "reading metadata", e))?;
        if !meta.is_file() {
            return Err(Error::NotAFile { path: path.into() });
        }
        let size = meta.len();
        let header = read_header(path, &file, size)?;
        Ok(Shard {
            path: path.to_path_buf(),
            size,
            header,
            file,
            map: OnceLock::new(),
            direct: OnceLock::new(),
            poisoned: AtomicBool::new(false),
        })
    }

    /// The file opened (and validated) at [`Shard::open`]: the same file even if the path
    /// has since been replaced, say by a rename.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Asks the kernel to start reading the file's bytes `[offset, offset + len)` into the
    /// page cache (`POSIX_FADV_WILLNEED`): it queues the reads and returns. A hint: errors
    /// are ignored, and a later read checks the file as always.
    pub fn will_need(&self, offset: u64, len: u64) {
        let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len))
        else {
            return;
        };
        // SAFETY: posix_fadvise only takes a hint about our own open file descriptor, which
        // `self.file` keeps open for the call.
        unsafe {
            libc::posix_fadvise(
                self.file.as_raw_fd(),
                offset,
                len,
                libc::POSIX_FADV_WILLNEED,
            )
        };
    }

    /// Errors if the file's size is no longer what it was at open.
    pub fn check_unchanged(&self) -> Result<()> {
        let actual = self
            .file
            .metadata()
            .map_err(|e| Error::io(&self.path, "reading metadata", e))?
            .len();
        if actual != self.size {
            return Err(Error::FileChanged {
                path: self.path.clone(),
                expected: self.size,
                actual,
            });
        }
        Ok(())
    }

    /// Copies `dst.len()` bytes from absolute file offset `offset` into `dst`.
    /// `tensor` names what is being read, for the error.
    pub fn read_into(
        &self,
        offset: u64,
        dst: &mut [u8],
        method: ReadMethod,
        tensor: &str,
    ) -> Result<()> {
        match method {
            ReadMethod::Pread => self.pread(offset, dst, tensor),
            ReadMethod::Direct => self.direct_read(offset, dst, tensor),
            ReadMethod::Mmap => {
                self.with_mapped(offset, dst.len(), tensor, |src| dst.copy_from_slice(src))
            }
        }
    }

    /// Runs `f` over the file bytes `[offset, offset + len)` in place in the mapping (no
    /// copy: the host quantizer reads them straight from the page cache). Guarded like a
    /// copy: a file that shrinks underneath is an error naming `tensor`, never a crash or
    /// a silent result computed from zeros.
    pub fn with_mapped<R>(
        &self,
        offset: u64,
        len: usize,
        tensor: &str,
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<R> {
        self.check_unchanged()?;
        let map = self.map()?;
        let src = &map[offset as usize..offset as usize + len];
        advise(src, MADV_POPULATE_READ);
        #[cfg(test)]
        test_hook::before_copy();
        let out = if self.poisoned.load(Ordering::Acquire) {
            None
        } else {
            match sigbus::guarded(src, f) {
                (out, true) => Some(out),
                (_, false) => None,
            }
        };
        // Drop our page-table entries for what was read, so that the mapping does not grow
        // the process's resident set; the pages stay in the page cache.
        advise(src, libc::MADV_DONTNEED);
        // A file cut short inside the read's last page raises no SIGBUS: that page still
        // belongs to the file and its tail reads as zeros. So the size is checked again
        // after every read; only a read that neither faulted nor saw the file change is
        // good (the size is read after the read finished, so a cut that zeroed what we read
        // is visible here).
        let actual = self.file.metadata().map(|m| m.len()).unwrap_or(0);
        match out {
            Some(out) if actual == self.size => Ok(out),
            _ => {
                self.poisoned.store(true, Ordering::Release);
                Err(Error::MappedReadFailed {
                    path: self.path.clone(),
                    tensor: tensor.to_string(),
                    at: offset,
                    expected_size: self.size,
                    actual_size: actual,
                })
            }
        }
    }

    /// Copies the file ranges `spans` ((offset, length), in file order, not overlapping)
    /// back to back into `dst` (their total length): one size check and one pair of page
    /// advices over the range they cover, then one guarded copy per range.
    pub fn read_spans_into(
        &self,
        spans: &[(u64, u64)],
        dst: &mut [u8],
        method: ReadMethod,
        tensor: &str,
    ) -> Result<()> {
        debug_assert_eq!(spans.iter().map(|s| s.1).sum::<u64>(), dst.len() as u64);
        let (Some(first), Some(last)) = (spans.first(), spans.last()) else {
            return Ok(());
        };
        if method != ReadMethod::Mmap {
            let mut at = 0usize;
            for &(offset, len) in spans {
                self.read_into(offset, &mut dst[at..at + len as usize], method, tensor)?;
                at += len as usize;
            }
            return Ok(());
        }
        self.check_unchanged()?;
        let map = self.map()?;
        let cover = &map[first.0 as usize..(last.0 + last.1) as usize];
        advise(cover, MADV_POPULATE_READ);
        let mut at = 0usize;
        let mut failed_at = None;
        for &(offset, len) in spans {
            let src = &map[offset as usize..(offset + len) as usize];
            let ok = !self.poisoned.load(Ordering::Acquire)
                && sigbus::guarded_copy(&mut dst[at..at + len as usize], src);
            if !ok {
                failed_at = Some(offset);
                break;
            }
            at += len as usize;
        }
        advise(cover, libc::MADV_DONTNEED);
        // As in read_into: a cut inside a copy's last page raises no SIGBUS, so the size is
        // checked again once the copies are done.
        let actual = self.file.metadata().map(|m| m.len()).unwrap_or(0);
        if failed_at.is_none() && actual == self.size {
            return Ok(());
        }
        self.poisoned.store(true, Ordering::Release);
        Err(Error::MappedReadFailed {
            path: self.path.clone(),
            tensor: tensor.to_string(),
            at: failed_at.unwrap_or(first.0),
            expected_size: self.size,
            actual_size: actual,
        })
    }

    /// The file opened again with `O_DIRECT`, or None where that fails.
    fn direct_file(&self) -> Option<&File> {
        self.direct
            .get_or_init(|| {
                std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECT | libc::O_NONBLOCK)
                    .open(format!(
                        "/proc/self/fd/{}",
                        std::os::fd::AsRawFd::as_raw_fd(&self.file)
                    ))
                    .ok()
            })
            .as_ref()
    }

    /// `O_DIRECT` reads of the aligned blocks covering `[offset, offset + dst.len())`
    /// through this thread's aligned buffer; `pread` where `O_DIRECT` is refused.
    fn direct_read(&self, offset: u64, dst: &mut [u8], tensor: &str) -> Result<()> {
        let Some(file) = self.direct_file() else {
            return self.pread(offset, dst, tensor);
        };
        let align = DIRECT_ALIGN as u64;
        let mut done = 0usize;
        while done < dst.len() {
            let at = offset + done as u64;
            let start = at & !(align - 1);
            let lead = (at - start) as usize;
            let want = (lead + dst.len() - done).min(DIRECT_BLOCK);
            let len = want.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
            let got = DIRECT_BUF.with(|b| -> std::io::Result<usize> {
                let mut b = b.borrow_mut();
                let buf = b.get(len);
                let mut n = 0usize;
                while n < len {
                    match file.read_at(&mut buf[n..len], start + n as u64) {
                        Ok(0) => break,
                        Ok(k) => n += k,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                    if !n.is_multiple_of(DIRECT_ALIGN) {
                        break; // the end of the file
                    }
                }
                let usable = n.min(want).saturating_sub(lead);
                dst[done..done + usable].copy_from_slice(&buf[lead..lead + usable]);
                Ok(usable)
            });
            match got {
                Ok(0) => {
                    return Err(Error::ShortRead {
                        path: self.path.clone(),
                        tensor: tensor.to_string(),
                        at,
                        expected_size: self.size,
                    })
                }
                Ok(k) => done += k,
                // an alignment the device does not take: the page cache instead
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    return self.pread(at, &mut dst[done..], tensor)
                }
                Err(e) => return Err(Error::io(&self.path, "reading (O_DIRECT)", e)),
            }
        }
        Ok(())
    }

    fn pread(&self, offset: u64, dst: &mut [u8], tensor: &str) -> Result<()> {
        let mut done = 0usize;
        while done < dst.len() {
            match self.file.read_at(&mut dst[done..], offset + done as u64) {
                Ok(0) => {
                    return Err(Error::ShortRead {
                        path: self.path.clone(),
                        tensor: tensor.to_string(),
                        at: offset + done as u64,
                        expected_size: self.size,
                    })
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(&self.path, "reading", e)),
            }
        }
        Ok(())
    }

    /// The fraction of `samples` byte offsets, spread evenly over the file, whose pages are in
    /// the page cache: a one-byte `preadv2(RWF_NOWAIT)` succeeds only from the cache (it
    /// needs no ownership of the file, unlike `mincore`). None where the kernel or the file
    /// system cannot say (no `RWF_NOWAIT`) or the file is empty. A probe that misses may
    /// start the kernel's read-ahead around its page (about to be read anyway), so a second
    /// call can see more cached than the first.
    pub fn cached_fraction(&self, samples: u64) -> Option<f64> {
        if self.size == 0 || samples == 0 {
            return None;
        }
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.file);
        let mut cached = 0u64;
        for i in 0..samples {
            // the first and the last byte, and evenly between
            let offset = if samples == 1 {
                0
            } else {
                (self.size - 1) * i / (samples - 1)
            };
            let mut byte = 0u8;
            let iov = libc::iovec {
                iov_base: (&mut byte as *mut u8).cast(),
                iov_len: 1,
            };
            // SAFETY: `iov` describes one writable byte that outlives the call; `fd` is our
            // open file; preadv2 writes at most `iov_len` bytes into it.
            let n = unsafe { libc::preadv2(fd, &iov, 1, offset as libc::off_t, libc::RWF_NOWAIT) };
            if n == 1 {
                cached += 1;
            } else if n < 0 {
                match std::io::Error::last_os_error().raw_os_error() {
                    Some(libc::EAGAIN) => {}
                    _ => return None, // EOPNOTSUPP, EINVAL (no RWF_NOWAIT), ...: cannot tell
                }
            }
        }
        Some(cached as f64 / samples as f64)
    }

    /// The whole file, mapped read-only (created on first use).
    pub fn map(&self) -> Result<&Mmap> {
        let m = self.map.get_or_init(|| {
            // SAFETY: the mapping is read-only and only ever read through checked slices
            // of the size recorded at open; a concurrent truncation is the documented risk
            // of ReadMethod::Mmap, which checks the size before each copy.
            unsafe { Mmap::map(&self.file) }.map_err(|e| e.to_string())
        });
        match m {
            Ok(m) if m.len() as u64 == self.size => Ok(m),
            Ok(m) => Err(Error::FileChanged {
                path: self.path.clone(),
                expected: self.size,
                actual: m.len() as u64,
            }),
            Err(msg) => Err(Error::io(
                &self.path,
                "mapping",
                std::io::Error::other(msg.clone()),
            )),
        }
    }
}

#[cfg(test)]
mod test_hook {
    use std::cell::RefCell;

    thread_local! {
        /// Runs between the size check and the copy, on the copying thread.
        pub static BEFORE_COPY: RefCell<Option<Box<dyn FnMut()>>> = const { RefCell::new(None) };
    }

    pub fn before_copy() {
        BEFORE_COPY.with(|h| {
            if let Some(f) = h.borrow_mut().as_mut() {
                f()
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file just written and synced reads as cached; after `POSIX_FADV_DONTNEED` (which
    /// drops clean pages on the file systems that honour it) as less cached. Where the
    /// kernel or file system has no `RWF_NOWAIT`, the answer is None, never a guess.
    #[test]
    fn cached_fraction_sees_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.safetensors");
        let n = 8usize << 20;
        let header = format!(r#"{{"w":{{"dtype":"U8","shape":[{n}],"data_offsets":[0,{n}]}}}}"#);
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend(std::iter::repeat_n(0x5au8, n));
        std::fs::write(&p, &bytes).unwrap();
        let shard = Shard::open(&p).unwrap();
        shard.file().sync_all().unwrap();
        let Some(warm) = shard.cached_fraction(32) else {
            return; // no RWF_NOWAIT here
        };
        assert!(warm > 0.9, "a file just written reads as {warm} cached");
        assert_eq!(shard.cached_fraction(0), None);
        let fd = std::os::fd::AsRawFd::as_raw_fd(shard.file());
        // SAFETY: fadvise only takes a hint about our own open file.
        unsafe { libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED) };
        let cold = shard.cached_fraction(32).unwrap();
        assert!((0.0..=1.0).contains(&cold));
        if cold < warm {
            assert!(
                cold < 0.5,
                "after DONTNEED {cold} of the file reads as cached"
            );
            // asked for, the pages come back without a read of ours
            shard.will_need(0, shard.size);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while shard.cached_fraction(32).unwrap() < 0.9 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "WILLNEED did not bring the file back into the page cache"
                );
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }

    /// A cut of a few bytes lands inside the copy's last page: no SIGBUS (the page still
    /// belongs to the file and its tail reads as zeros), so only a check after the copy sees it.
    #[test]
    fn a_cut_inside_the_last_page_between_check_and_copy_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.safetensors");
        let header = r#"{"w":{"dtype":"U8","shape":[100000],"data_offsets":[0,100000]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend(std::iter::repeat_n(0x5au8, 100_000));
        std::fs::write(&p, &bytes).unwrap();
        let shard = Shard::open(&p).unwrap();
        let size = shard.size;
        let start = shard.header.data_start;
        let cut = p.clone();
        test_hook::BEFORE_COPY.with(|h| {
            *h.borrow_mut() = Some(Box::new(move || {
                let f = std::fs::OpenOptions::new().write(true).open(&cut).unwrap();
                f.set_len(size - 87).unwrap();
            }))
        });
        let mut dst = vec![0u8; 100_000];
        let res = shard.read_into(start, &mut dst, ReadMethod::Mmap, "w");
        test_hook::BEFORE_COPY.with(|h| *h.borrow_mut() = None);
        let zeros = dst.iter().filter(|&&b| b == 0).count();
        let err = res.expect_err(&format!("a silent read with {zeros} zero bytes"));
        assert!(
            matches!(
                err,
                Error::MappedReadFailed { .. } | Error::FileChanged { .. }
            ),
            "{err}"
        );
        let msg = err.to_string();
        assert!(msg.contains("x.safetensors"), "{msg}");
    }
}
