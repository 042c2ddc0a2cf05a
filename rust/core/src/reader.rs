//! The budgeted parallel reader.
//!
//! Native threads copy planned byte ranges out of the shards into one caller-owned buffer.
//! The buffer is managed as a ring (see [`crate::ring`]): every byte that is being read,
//! is read and waiting, or is held by the consumer lives in it, so the bytes in flight never
//! exceed its size, the memory budget. Items are split into chunks (at most `chunk_bytes`,
//! or whole items) that are allocated and delivered in plan order (a background item's
//! chunks spread between the others', [`ReadItem::background`]); each chunk is split into
//! pieces of at most `piece_bytes` that the threads copy in parallel. With `merge_bytes`,
//! consecutive chunks of one item that are already read when the consumer asks come as one
//! delivery (released whole). An error, `cancel`, or
//! dropping the reader stops the threads; drop joins them, after which no thread touches
//! the buffer again.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::plan::{validate, ReadItem};
use crate::quant::{self, quantize_rows, quantize_rows_with_amax};
use crate::ring::Ring;
use crate::shard::ReadMethod;

/// The most threads used by default.
pub const MAX_DEFAULT_THREADS: usize = 16;

/// The nice value reader threads give themselves: when they keep every core busy, the
/// thread that consumes their chunks (and feeds the GPU) still gets a core the moment it
/// wakes, instead of waiting for a time slice.
pub const READER_NICE: i32 = 10;

/// Lowers the calling thread's priority to [`READER_NICE`] (best effort: raising one's own
/// nice value needs no privilege, and a failure only leaves the priority as it was).
fn lower_priority() {
    // SAFETY: gettid has no preconditions; setpriority with PRIO_PROCESS and a thread id
    // changes only that thread's nice value (Linux).
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, READER_NICE);
    }
}

#[derive(Debug, Clone)]
pub struct ReaderConfig {
    pub threads: usize,
    /// Largest chunk read into the buffer (and delivered, unless merged: `merge_bytes`);
    /// None delivers each item whole (it must fit the budget).
    pub chunk_bytes: Option<u64>,
    /// Largest unit of work one thread copies at a time.
    pub piece_bytes: u64,
    pub method: ReadMethod,
    /// Up to this many bytes of consecutive chunks of one item that are all read when the
    /// first is asked for, and lie back to back in the buffer, are delivered as one (fewer,
    /// larger deliveries for a consumer that is slower than the threads); 0: never. Never
    /// for quantized items (each chunk holds its own e4m3 bytes and scales).
    pub merge_bytes: u64,
    /// The rate at which the consumer moves the ring's bytes on (host to device, bytes a
    /// second): with it, an optional item is quantized on the way when that keeps the
    /// threads' work and the bus's as even as the plan so far allows ([`Shared::decide`]);
    /// 0: when the threads' idle time pays for it.
    pub bus_bytes_per_s: f64,
    /// Bytes of the items' file ranges, in plan order, that the page cache is asked to read
    /// (`POSIX_FADV_WILLNEED`, from one more thread) ahead of the chunks the threads have
    /// been given: for a cold load, a disk queue as deep as the window, whatever the thread
    /// count. 0: none (a warm load: the pages are there). Not with [`ReadMethod::Direct`],
    /// which bypasses the page cache.
    pub read_ahead_bytes: u64,
}

impl Default for ReaderConfig {
    fn default() -> Self {
        ReaderConfig {
            threads: default_threads(),
            chunk_bytes: Some(64 << 20),
            piece_bytes: 4 << 20,
            method: ReadMethod::default(),
            merge_bytes: 0,
            bus_bytes_per_s: 0.0,
            read_ahead_bytes: 0,
        }
    }
}

/// The machine's cores but one (left to the thread that consumes the chunks), at least 1
/// and at most [`MAX_DEFAULT_THREADS`]. On the 16-core H200 machine 15 threads load 14%
/// faster than 16 (benches/results/load_h200.json).
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(4)
        .saturating_sub(1)
        .clamp(1, MAX_DEFAULT_THREADS)
}

/// Caller-owned destination memory.
#[derive(Debug, Clone, Copy)]
pub struct DestBuffer {
    ptr: *mut u8,
    len: u64,
}

// SAFETY: DestBuffer is a plain address range; the reader hands disjoint regions of it to
// its threads (the ring never gives one byte to two live chunks), so sharing it is sound.
unsafe impl Send for DestBuffer {}
// SAFETY: as above; no two threads write the same byte.
unsafe impl Sync for DestBuffer {}

impl DestBuffer {
    /// # Safety
    /// `ptr` must be valid for writes of `len` bytes for as long as the [`Reader`] built on
    /// it lives, and nothing else may write to it meanwhile; the caller may read a region only
    /// after it has been delivered and until it has released it.
    pub unsafe fn new(ptr: *mut u8, len: u64) -> DestBuffer {
        DestBuffer { ptr, len }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A chunk ready for the consumer: bytes `[item_offset, item_offset + len)` of item `item`
/// are at `[buf_offset, buf_offset + len)` of the buffer until released.
///
/// For an item quantized on the way ([`ReadItem::quant`]), the chunk is the whole rows at
/// source bytes `[item_offset, item_offset + src_len)`: their e4m3 bytes (`rows * cols`),
/// then their scales (`rows` values of the source dtype), `len` bytes in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub item: usize,
    pub item_offset: u64,
    pub buf_offset: u64,
    pub len: u64,
    /// Source bytes the chunk covers (`len` unless the item is quantized).
    pub src_len: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Ready(Delivery),
    /// Nothing ready within the timeout; ask again.
    Pending,
    Done,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub budget: u64,
    pub peak_in_flight: u64,
    pub bytes_read: u64,
    pub threads: usize,
    /// Time the threads spent, summed over them, idle with chunks still to read: the ring
    /// was full (the consumer had not released enough yet), in nanoseconds.
    pub room_wait_ns: u64,
    /// Pieces of work the threads took (a piece: one read of one or more spans of a shard).
    pub pieces: u64,
}

/// A chunk's course through the ring ([`Reader::chunk_times`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkTimes {
    pub item: usize,
    /// source bytes
    pub src_len: u64,
    /// ns since the reader started: allocated (its pieces queued), read (the last piece
    /// done), delivered to the consumer, released by it; 0: not yet
    pub alloc_ns: u64,
    pub read_ns: u64,
    pub deliver_ns: u64,
    pub release_ns: u64,
}

#[derive(Debug, Clone, Copy)]
struct ChunkPlan {
    item: usize,
    /// in source bytes
    item_offset: u64,
    /// bytes of the buffer it takes
    len: u64,
    /// source bytes it covers
    src_len: u64,
}

/// One thread's unit of work: file ranges of one shard copied, back to back, to `dst`.
/// Small ranges close together in the file (a row-parallel slice: one range per row) share
/// a piece, so that a thread pays the per-piece costs (the lock, the size check, the page
/// advice) once for many of them.
#[derive(Debug)]
struct Piece {
    chunk: usize,
    item: usize,
    shard: usize,
    /// (file offset, length), in file order
    spans: Vec<(u64, u64)>,
    /// where the bytes go (the e4m3 bytes, for a quantized item)
    dst: u64,
    /// source bytes
    len: u64,
    /// where the scales go, for a quantized item
    scale_dst: Option<u64>,
    /// the item's row the piece starts at, for a quantized item
    row: u64,
}

/// Source bytes per unit and ring bytes per unit of `item` (a unit: a byte, or, quantized
/// on the way, a row).
fn units_of(item: &ReadItem, quantized: bool) -> (u64, u64) {
    match item.quant {
        Some(q) if quantized => (q.row_bytes(), q.out_row_bytes()),
        _ => (1, 1),
    }
}

/// The chunks of item `i` (`step` units each, at least one chunk), read quantized or not as
/// [`units_of`] says.
fn chunk_plans(i: usize, unit: u64, out_unit: u64, units: u64, step: u64) -> Vec<ChunkPlan> {
    let mut plans = Vec::new();
    let mut at = 0;
    loop {
        let n = step.min(units - at);
        plans.push(ChunkPlan {
            item: i,
            item_offset: at * unit,
            len: n * out_unit,
            src_len: n * unit,
        });
        at += n;
        if at >= units {
            return plans;
        }
    }
}

/// The most idle thread time [`Shared::decide`] saves up (ns): idle time long past (the
/// load's start, a slow stretch) does not pay for quantizing much later.
const CREDIT_CAP_NS: u64 = 50_000_000;

/// A thread's cost of a source byte before the first piece of its kind is timed (ps): a read
/// at 4 GB/s a thread, as on the H200 machines' Xeons.
const PRIOR_READ_PS: f64 = 250.0;

/// The weight of a new piece's cost in the running averages of [`State::read_ps`] and
/// [`State::quant_ps`].
const COST_EWMA: f64 = 1.0 / 16.0;

/// The largest gap between two ranges of one piece: past it they are separate pieces.
const MAX_GAP: u64 = 1 << 20;

/// The most bytes of one read-ahead request ([`ReaderConfig::read_ahead_bytes`]).
const READ_AHEAD_STEP: u64 = 8 << 20;

/// How long the read-ahead thread sleeps when it is a window ahead of the threads.
const READ_AHEAD_POLL: Duration = Duration::from_millis(2);

/// The most source bytes of one piece of a quantized item (at least one row): the thread
/// reads them into its own scratch buffer, which stays in its core's cache, and quantizes
/// from there. Read with `mmap` there is no scratch buffer (the rows are quantized in
/// place in the mapping): pieces are `piece_bytes`, so fewer of them unmap their pages.
const QUANT_PIECE_BYTES: u64 = 1 << 20;

#[derive(Debug)]
struct State {
    ring: Ring,
    /// The chunks of the items planned so far, in the order they are allocated and
    /// delivered (plan order, the background items' placed between the others'): an item's
    /// are planned when the allocator reaches it (an optional item's layout depends on the
    /// reader's decision then, [`Shared::decide`]).
    chunks: Vec<ChunkPlan>,
    /// Whether each planned item is quantized on the way (one entry per item planned).
    quantized: Vec<bool>,
    next_alloc: usize,
    next_deliver: usize,
    buf_at: Vec<u64>,
    remaining: Vec<u32>,
    queue: VecDeque<Piece>,
    /// Delivered, unreleased deliveries of nonzero length: buffer offset -> the first and
    /// last chunk delivered there (more than one: merged). Live ring regions never overlap,
    /// so one offset names at most one of them.
    held: HashMap<u64, (usize, usize)>,
    error: Option<Error>,
    failed: bool,
    stopped: bool,
    bytes_read: u64,
    room_wait_ns: u64,
    pieces: u64,
    /// Items quantized on the way with a NaN scale in some chunk (a row held NaN or Inf),
    /// in the order found.
    non_finite: Vec<usize>,
    /// Threads' idle time not yet spent on quantizing optional items ([`Shared::decide`]).
    credit_ns: u64,
    /// Threads waiting for room now, and when `room_wait_ns` last counted them.
    room_waiters: u64,
    accrued_at: Instant,
    /// A thread's time per source byte (ps) of the pieces read plain, and of those
    /// quantized on the way (read included), running averages of the pieces timed so far.
    read_ps: Option<f64>,
    quant_ps: Option<f64>,
    /// The bytes of the items planned so far: source bytes read plain (the bus carries them
    /// all), source bytes quantized on the way, and what of those the bus carries.
    plain_bytes: u64,
    host_bytes: u64,
    host_out_bytes: u64,
    /// When the reader started, and each planned chunk's [`ChunkTimes`] since then (ns).
    started: Instant,
    times: Vec<[u64; 4]>,
    /// The background items' chunks ([`ReadItem::background`]) not yet placed in `chunks`,
    /// in plan order, and the source bytes placed so far and in all, of theirs and of the
    /// other items': a background chunk is placed after another item's chunk while the
    /// background's share of the bytes placed stays within its share of the plan.
    bg: VecDeque<ChunkPlan>,
    bg_placed: u64,
    bg_total: u64,
    main_placed: u64,
    main_total: u64,
}

impl State {
    /// Appends chunk `c` to the plan (not yet allocated).
    fn push_chunk(&mut self, c: ChunkPlan) {
        self.chunks.push(c);
        self.buf_at.push(0);
        self.times.push([0; 4]);
        self.remaining.push(0);
    }

    /// Places the background chunks whose turn has come after `main_placed` source bytes of
    /// the other items (all that are left when `all`).
    fn place_background(&mut self, all: bool) {
        while let Some(&b) = self.bg.front() {
            let share = (self.bg_placed + b.src_len) as u128 * self.main_total as u128;
            if !all && share > self.main_placed as u128 * self.bg_total as u128 {
                return;
            }
            self.bg.pop_front();
            self.bg_placed += b.src_len;
            self.push_chunk(b);
        }
    }
}

impl State {
    fn now_ns(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }
}

impl State {
    /// Counts the time the threads waiting for room have waited since the last count.
    fn accrue(&mut self) {
        let now = Instant::now();
        let idle = self.room_waiters * now.duration_since(self.accrued_at).as_nanos() as u64;
        self.accrued_at = now;
        self.room_wait_ns += idle;
        self.credit_ns = (self.credit_ns + idle).min(CREDIT_CAP_NS);
    }
}

/// Source bytes of the items planned so far, by how they are read ([`quantize_balances`]).
#[derive(Debug, Clone, Copy)]
pub struct PlannedBytes {
    /// read plain: the threads read them, the bus carries them
    pub plain: f64,
    /// quantized on the way: the threads read and quantize them
    pub host: f64,
    /// what the bus carries of `host` (e4m3 bytes and scales)
    pub host_out: f64,
}

/// Whether quantizing the next item (`bytes` source bytes, `out_bytes` of them on the bus
/// quantized) on the way finishes `plan` and the item sooner than reading it plain, with
/// the threads' work (`read_ps` / `quant_ps` a source byte, on `threads` threads at once)
/// and the bus's (`bus_ps` a byte) running side by side: the later of the two ends first.
pub fn quantize_balances(
    plan: &PlannedBytes,
    bytes: f64,
    out_bytes: f64,
    read_ps: f64,
    quant_ps: f64,
    bus_ps: f64,
    threads: f64,
) -> bool {
    let threads = threads.max(1.0);
    let end = |plain: f64, host: f64, host_out: f64| {
        let cores = (plain * read_ps + host * quant_ps) / threads;
        let bus = (plain + host_out) * bus_ps;
        cores.max(bus)
    };
    let quantized = end(plan.plain, plan.host + bytes, plan.host_out + out_bytes);
    let plain = end(plan.plain + bytes, plan.host, plan.host_out);
    quantized < plain
}

/// The items' file ranges in plan order, each shard's ranges no more than [`MAX_GAP`]
/// apart joined (a tensor-parallel slice: one range a row), as (shard, offset, len, the
/// items' source bytes before the range, those within it: `len` less the gaps).
fn file_ranges(items: &[ReadItem]) -> Vec<(usize, u64, u64, u64, u64)> {
    let mut out: Vec<(usize, u64, u64, u64, u64)> = Vec::new();
    let mut src = 0u64;
    for seg in items.iter().flat_map(|i| &i.segments) {
        if seg.len == 0 {
            continue;
        }
        src += seg.len;
        if let Some(last) = out.last_mut() {
            let end = last.1 + last.2;
            if last.0 == seg.shard && seg.offset >= end && seg.offset - end <= MAX_GAP {
                last.2 = seg.offset + seg.len - last.1;
                last.4 += seg.len;
                continue;
            }
        }
        out.push((seg.shard, seg.offset, seg.len, src - seg.len, seg.len));
    }
    out
}

struct Shared {
    ckpt: Arc<Checkpoint>,
    items: Vec<ReadItem>,
    /// `cfg.chunk_bytes`, at most the budget
    chunk_bytes: Option<u64>,
    buf: DestBuffer,
    cfg: ReaderConfig,
    state: Mutex<State>,
    cv: Condvar,
    /// Worker threads that have not returned yet.
    live: AtomicUsize,
    /// Source bytes of the chunks allocated so far (given to the threads), for the
    /// read-ahead thread.
    allocated_src: AtomicU64,
}

pub struct Reader {
    shared: Arc<Shared>,
    /// Taken (and joined) by the first `close`; behind a lock so that `close` works through
    /// a shared reference while other threads are inside `next`.
    workers: Mutex<Vec<JoinHandle<()>>>,
}

/// Counts a worker out when it returns, however it returns.
struct LiveGuard<'a>(&'a AtomicUsize);

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Reader {
    /// Starts reading `items` of `ckpt` into `buf`, whose length is the memory budget.
    pub fn start(
        ckpt: Arc<Checkpoint>,
        items: Vec<ReadItem>,
        buf: DestBuffer,
        cfg: ReaderConfig,
    ) -> Result<Reader> {
        validate(&ckpt, &items)?;
        if cfg.threads == 0 || cfg.piece_bytes == 0 || cfg.chunk_bytes == Some(0) {
            return Err(Error::Invalid(
                "threads, piece_bytes and chunk_bytes must be positive".into(),
            ));
        }
        let budget = buf.len();
        let chunk_bytes = cfg.chunk_bytes.map(|c| c.min(budget.max(1)));
        for q in items.iter().filter(|i| i.optional).filter_map(|i| i.quant) {
            // measured now, not under the lock when the first one is decided
            quant::core_ps_per_byte(q.dtype);
        }
        for item in &items {
            // an optional item may be read either way: both must fit
            let ways: &[bool] = if item.optional {
                &[true, false]
            } else {
                &[item.quant.is_some()]
            };
            for &quantized in ways {
                let (unit, out_unit) = units_of(item, quantized);
                let units = item.len() / unit;
                let over = match chunk_bytes {
                    None => units * out_unit > budget,
                    Some(_) => out_unit > budget && units > 0,
                };
                if over {
                    let seg = item.segments[0];
                    return Err(Error::TensorOverBudget {
                        path: ckpt.shards[seg.shard].path.clone(),
                        tensor: item.name.clone(),
                        needed: if chunk_bytes.is_none() {
                            units * out_unit
                        } else {
                            out_unit
                        },
                        budget,
                    });
                }
            }
        }
        if budget == 0 && items.iter().any(|i| !i.is_empty()) {
            return Err(Error::Invalid("the memory budget is 0 bytes".into()));
        }
        let shared = Arc::new(Shared {
            ckpt,
            chunk_bytes,
            buf,
            state: Mutex::new(State {
                ring: Ring::new(budget),
                chunks: Vec::new(),
                quantized: Vec::with_capacity(items.len()),
                next_alloc: 0,
                next_deliver: 0,
                buf_at: Vec::new(),
                remaining: Vec::new(),
                queue: VecDeque::new(),
                held: HashMap::new(),
                error: None,
                failed: false,
                stopped: false,
                bytes_read: 0,
                room_wait_ns: 0,
                pieces: 0,
                non_finite: Vec::new(),
                credit_ns: 0,
                room_waiters: 0,
                accrued_at: Instant::now(),
                read_ps: None,
                quant_ps: None,
                plain_bytes: 0,
                host_bytes: 0,
                host_out_bytes: 0,
                started: Instant::now(),
                times: Vec::new(),
                bg: VecDeque::new(),
                bg_placed: 0,
                bg_total: 0,
                main_placed: 0,
                main_total: 0,
            }),
            cv: Condvar::new(),
            live: AtomicUsize::new(0),
            allocated_src: AtomicU64::new(0),
            cfg,
            items,
        });
        {
            let mut st = shared.lock();
            for (i, item) in shared.items.iter().enumerate() {
                if shared.in_background(item) {
                    let (unit, out_unit, units, step) = shared.chunking(i, false);
                    st.bg.extend(chunk_plans(i, unit, out_unit, units, step));
                    st.bg_total += item.len();
                } else {
                    st.main_total += item.len();
                }
            }
        }
        let workers = (0..shared.cfg.threads)
            .map(|i| {
                let s = Arc::clone(&shared);
                shared.live.fetch_add(1, Ordering::AcqRel);
                std::thread::Builder::new()
                    .name(format!("fastfp8-read-{i}"))
                    .spawn(move || {
                        let _live = LiveGuard(&s.live);
                        lower_priority();
                        s.work()
                    })
                    .map_err(|e| {
                        shared.live.fetch_sub(1, Ordering::AcqRel);
                        Error::Invalid(format!("cannot start reader thread: {e}"))
                    })
            })
            .collect::<Result<Vec<_>>>();
        let mut workers = match workers {
            Ok(w) => w,
            Err(e) => {
                shared.stop();
                return Err(e);
            }
        };
        if shared.cfg.read_ahead_bytes > 0 && shared.cfg.method != ReadMethod::Direct {
            let s = Arc::clone(&shared);
            // best effort: without it the threads read as they would with no read-ahead
            if let Ok(h) = std::thread::Builder::new()
                .name("fastfp8-readahead".into())
                .spawn(move || s.read_ahead())
            {
                workers.push(h);
            }
        }
        Ok(Reader {
            shared,
            workers: Mutex::new(workers),
        })
    }

    pub fn items(&self) -> &[ReadItem] {
        &self.shared.items
    }

    /// Whether item `item` is read quantized on the way: its [`ReadItem::quant`], or for an
    /// optional item what the reader decided when it reached it (None until then; decided
    /// before its first chunk is delivered, and never changed).
    pub fn quantized(&self, item: usize) -> Option<bool> {
        self.shared.lock().quantized.get(item).copied()
    }

    /// Waits up to `timeout` for the next chunk in plan order (background items' chunks
    /// between the others').
    pub fn next_timeout(&self, timeout: Duration) -> Result<Next> {
        let sh = &self.shared;
        let mut st = sh.lock();
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(e) = st.error.take() {
                return Err(e);
            }
            if st.failed {
                return Err(Error::Cancelled);
            }
            if st.next_deliver == st.chunks.len()
                && st.quantized.len() == sh.items.len()
                && st.bg.is_empty()
            {
                return Ok(Next::Done);
            }
            let c = st.next_deliver;
            if st.next_alloc > c && st.remaining[c] == 0 {
                let plan = st.chunks[c];
                let at = st.buf_at[c];
                let (last, len, src_len) = sh.merged(&st, c);
                st.next_deliver = last + 1;
                let now = st.now_ns();
                for t in &mut st.times[c..=last] {
                    t[2] = now;
                }
                if len > 0 {
                    st.held.insert(at, (c, last));
                }
                return Ok(Next::Ready(Delivery {
                    item: plan.item,
                    item_offset: plan.item_offset,
                    buf_offset: at,
                    len,
                    src_len,
                }));
            }
            sh.fill(&mut st);
            if st.next_alloc == c && !st.stopped {
                // Everything allocated has been delivered and the next chunk does not fit:
                // only the consumer can make room.
                let (item, needed) = match st.chunks.get(c) {
                    Some(plan) => (plan.item, plan.len),
                    // not planned: the item's first chunk fits neither way
                    None => (
                        st.quantized.len(),
                        sh.first_chunk_len(st.quantized.len(), false),
                    ),
                };
                return Err(Error::BudgetExhausted {
                    tensor: sh.items[item].name.clone(),
                    held: st.ring.used(),
                    needed,
                    budget: st.ring.capacity(),
                });
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return Ok(Next::Pending);
            }
            st = sh
                .cv
                .wait_timeout(st, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// Blocks until the next chunk (no timeout).
    pub fn next(&self) -> Result<Option<Delivery>> {
        loop {
            match self.next_timeout(Duration::from_secs(3600))? {
                Next::Ready(d) => return Ok(Some(d)),
                Next::Done => return Ok(None),
                Next::Pending => {}
            }
        }
    }

    /// Gives a delivered chunk back to the ring: `buf_offset` and `len` must be those of a
    /// delivered chunk not released yet. Anything else (a chunk not delivered yet, one
    /// released already, a wrong length, an offset where no chunk starts) is an
    /// [`Error::InvalidRelease`] and frees nothing: freeing a region that the threads are
    /// still writing, or that was handed out again, would give two chunks the same bytes.
    /// A zero-length chunk holds nothing, so releasing `len == 0` is a no-op.
    pub fn release(&self, buf_offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let sh = &self.shared;
        let mut st = sh.lock();
        let Some(&(first, last)) = st.held.get(&buf_offset) else {
            return Err(Error::InvalidRelease {
                buf_offset,
                len,
                why: "no delivered, unreleased chunk starts there".into(),
            });
        };
        let held: u64 = (first..=last).map(|c| st.chunks[c].len).sum();
        if held != len {
            return Err(Error::InvalidRelease {
                buf_offset,
                len,
                why: format!(
                    "the chunk delivered there (of tensor {:?}) is {held} bytes long",
                    sh.items[st.chunks[first].item].name
                ),
            });
        }
        st.held.remove(&buf_offset);
        let now = st.now_ns();
        for t in &mut st.times[first..=last] {
            t[3] = now;
        }
        for c in first..=last {
            let (at, len) = (st.buf_at[c], st.chunks[c].len);
            st.ring
                .free(at, len)
                .expect("a held chunk is a live ring region of its length");
        }
        sh.fill(&mut st);
        drop(st);
        sh.cv.notify_all();
        Ok(())
    }

    /// Stops the threads; later calls of `next` fail with `Cancelled`.
    pub fn cancel(&self) {
        self.shared.stop();
    }

    /// Stops the threads and waits until every one has returned: afterwards no thread
    /// touches the buffer again, whoever else still holds this reader (a thread inside
    /// `next`, say). Idempotent; a second caller waits for the first one's joins.
    pub fn close(&self) {
        self.shared.stop();
        let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        for w in workers.drain(..) {
            let _ = w.join();
        }
    }

    /// Worker threads still running (0 after `close`).
    pub fn live_threads(&self) -> usize {
        self.shared.live.load(Ordering::Acquire)
    }

    /// Each chunk planned so far, in plan order, with when it was allocated in the ring,
    /// read, delivered and released (ns since the reader started; 0: not yet): where a
    /// chunk's time goes between the threads and the consumer.
    pub fn chunk_times(&self) -> Vec<ChunkTimes> {
        let st = self.shared.lock();
        st.chunks
            .iter()
            .zip(&st.times)
            .map(|(c, t)| ChunkTimes {
                item: c.item,
                src_len: c.src_len,
                alloc_ns: t[0],
                read_ns: t[1],
                deliver_ns: t[2],
                release_ns: t[3],
            })
            .collect()
    }

    /// The items quantized on the way that hold a NaN or Inf (a NaN scale in a chunk read
    /// so far), in plan order: the load reports them without reading their scales back.
    pub fn non_finite(&self) -> Vec<usize> {
        let mut items = self.shared.lock().non_finite.clone();
        items.sort_unstable();
        items
    }

    pub fn stats(&self) -> Stats {
        let mut st = self.shared.lock();
        st.accrue(); // the waits going on now, so far
        Stats {
            budget: st.ring.capacity(),
            peak_in_flight: st.ring.peak(),
            bytes_read: st.bytes_read,
            threads: self.shared.cfg.threads,
            room_wait_ns: st.room_wait_ns,
            pieces: st.pieces,
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.close();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stop(&self) {
        let mut st = self.lock();
        st.stopped = true;
        st.failed = true;
        st.queue.clear();
        drop(st);
        self.cv.notify_all();
    }

    /// The chunks delivered as one starting at `c` (read, allocated): `c` and the read
    /// chunks after it of the same item that continue it both in the item and in the
    /// buffer, up to `merge_bytes` in all. Returns (last chunk, len, src_len).
    fn merged(&self, st: &State, c: usize) -> (usize, u64, u64) {
        let first = st.chunks[c];
        let (mut last, mut len, mut src_len) = (c, first.len, first.src_len);
        // (a background item's chunks may come before the plan reaches it: read as it is)
        let quantized = st.quantized.get(first.item).copied().unwrap_or(false);
        if self.cfg.merge_bytes == 0 || first.len == 0 || quantized {
            return (last, len, src_len);
        }
        while last + 1 < st.next_alloc && st.remaining[last + 1] == 0 {
            let next = st.chunks[last + 1];
            if next.item != first.item
                || next.len == 0
                || next.item_offset != first.item_offset + src_len
                || st.buf_at[last + 1] != st.buf_at[c] + len
                || len + next.len > self.cfg.merge_bytes
            {
                break;
            }
            last += 1;
            len += next.len;
            src_len += next.src_len;
        }
        (last, len, src_len)
    }

    /// Plans the chunks of the next item, deciding first whether an optional item is
    /// quantized on the way ([`Shared::decide`]); false when every item is planned, or when
    /// an optional item's first chunk does not fit the ring now (it is decided when it
    /// does, as late as possible).
    fn plan_next(&self, st: &mut State) -> bool {
        let i = loop {
            let i = st.quantized.len();
            let Some(item) = self.items.get(i) else {
                // every item planned: the background's chunks left go last
                let any = !st.bg.is_empty();
                st.place_background(true);
                return any;
            };
            if !self.in_background(item) {
                break i;
            }
            // its chunks are in `bg`, placed between the other items' chunks
            st.quantized.push(false);
            st.plain_bytes += item.len();
        };
        let item = &self.items[i];
        let quantized = if item.optional {
            let first = self
                .first_chunk_len(i, false)
                .max(self.first_chunk_len(i, true));
            if first > 0 && st.ring.fits(first).is_none() {
                return false;
            }
            self.decide(st, i)
        } else {
            item.quant.is_some()
        };
        st.quantized.push(quantized);
        let (unit, out_unit, units, step) = self.chunking(i, quantized);
        if quantized {
            st.host_bytes += units * unit;
            st.host_out_bytes += units * out_unit;
        } else {
            st.plain_bytes += units * unit;
        }
        for c in chunk_plans(i, unit, out_unit, units, step) {
            st.main_placed += c.src_len;
            st.push_chunk(c);
            st.place_background(false);
        }
        true
    }

    /// Whether `item`'s chunks go out between the other items' ([`ReadItem::background`]):
    /// not with a read-ahead window, which walks the items in plan order.
    fn in_background(&self, item: &ReadItem) -> bool {
        item.background && self.cfg.read_ahead_bytes == 0
    }

    /// Whether the threads quantize the optional item `i` reached now.
    ///
    /// With the bus's rate ([`ReaderConfig::bus_bytes_per_s`]): when the plan so far, this
    /// item included, then finishes sooner, the threads' work and the bus's running side by
    /// side ([`quantize_balances`]; the threads' costs measured on their pieces so far). FP8
    /// halves what the bus carries and costs the threads the quantization: each weight goes
    /// to the side that keeps the cores and the bus both busy.
    ///
    /// Without it: when the time the threads have spent idle for want of room in the ring
    /// (the bus or the consumer setting the pace), less what the optional items they
    /// quantized cost, covers what quantizing this one costs (at one core's measured rate,
    /// [`quant::core_ps_per_byte`]). Spare time buys FP8 over the bus; none left, they only
    /// read, and leave the item to the device.
    fn decide(&self, st: &mut State, i: usize) -> bool {
        st.accrue();
        let item = &self.items[i];
        let core_ps = item.quant.map_or(0, |q| quant::core_ps_per_byte(q.dtype));
        if self.cfg.bus_bytes_per_s > 0.0 {
            let (_, out_unit, units, _) = self.chunking(i, true);
            let read_ps = st.read_ps.unwrap_or(PRIOR_READ_PS);
            let plan = PlannedBytes {
                plain: st.plain_bytes as f64,
                host: st.host_bytes as f64,
                host_out: st.host_out_bytes as f64,
            };
            return quantize_balances(
                &plan,
                item.len() as f64,
                (units * out_unit) as f64,
                read_ps,
                st.quant_ps.unwrap_or(read_ps + core_ps as f64),
                1e12 / self.cfg.bus_bytes_per_s,
                self.cfg.threads as f64,
            );
        }
        let cost = item.len().saturating_mul(core_ps) / 1000;
        if st.credit_ns >= cost {
            st.credit_ns -= cost;
            true
        } else {
            false
        }
    }

    /// The bytes of item `i`'s first chunk in the ring, read quantized or not.
    fn first_chunk_len(&self, i: usize, quantized: bool) -> u64 {
        let (_, out_unit, units, step) = self.chunking(i, quantized);
        step.min(units) * out_unit
    }

    /// How item `i` is cut into chunks, read quantized or not: source bytes and ring bytes
    /// per unit ([`units_of`]), its units, and the units of a chunk.
    fn chunking(&self, i: usize, quantized: bool) -> (u64, u64, u64, u64) {
        let item = &self.items[i];
        let (unit, out_unit) = units_of(item, quantized);
        let units = item.len() / unit;
        let step = self
            .chunk_bytes
            .map_or(units, |c| (c / out_unit).max(1))
            .max(1);
        (unit, out_unit, units, step)
    }

    /// Allocates the next chunks, in the order of `chunks`, while they fit, and queues their
    /// pieces.
    fn fill(&self, st: &mut State) {
        while !st.stopped {
            if st.next_alloc == st.chunks.len() && !self.plan_next(st) {
                return;
            }
            let c = st.next_alloc;
            let plan = st.chunks[c];
            let at = if plan.len == 0 {
                0
            } else {
                match st.ring.alloc(plan.len) {
                    Some(at) => at,
                    None => return,
                }
            };
            st.buf_at[c] = at;
            st.next_alloc += 1;
            self.allocated_src
                .fetch_add(plan.src_len, Ordering::Release);
            st.times[c][0] = st.now_ns();
            let mut n = 0u32;
            let item = &self.items[plan.item];
            let mut skip = plan.item_offset;
            let mut todo = plan.src_len;
            let mut dst = at;
            let mut cur: Option<Piece> = None;
            // a quantized item: pieces of whole rows, e4m3 bytes then scales
            // (a background item has no `quant`: it may come before the plan reaches it)
            let quant = item.quant.filter(|_| st.quantized[plan.item]).map(|q| {
                let rows = plan.src_len / q.row_bytes();
                let piece = match self.cfg.method {
                    ReadMethod::Mmap => self.cfg.piece_bytes,
                    _ => self.cfg.piece_bytes.min(QUANT_PIECE_BYTES),
                };
                let piece_rows = (piece / q.row_bytes()).max(1);
                (q, at + rows * q.cols, piece_rows * q.row_bytes())
            });
            let mut scale_at = quant.map_or(0, |(_, s, _)| s);
            for seg in &item.segments {
                if todo == 0 {
                    break;
                }
                if skip >= seg.len {
                    skip -= seg.len;
                    continue;
                }
                let mut off = seg.offset + skip;
                let mut left = (seg.len - skip).min(todo);
                skip = 0;
                while left > 0 {
                    let (limit, scale_dst, row) = match quant {
                        Some((q, _, piece_src)) => (
                            piece_src,
                            Some(scale_at),
                            (plan.item_offset + plan.src_len - todo) / q.row_bytes(),
                        ),
                        None => (self.cfg.piece_bytes, None, 0),
                    };
                    let l = left.min(limit);
                    // Short segments join the piece before them (a tensor-parallel row
                    // slice: one segment a row): one read of their span, not one each.
                    let joins = cur.as_ref().is_some_and(|p| {
                        let (o, len) = *p.spans.last().expect("a piece has a span");
                        p.shard == seg.shard
                            && p.len + l <= limit
                            && off >= o + len
                            && off - (o + len) <= MAX_GAP
                    });
                    if joins {
                        let p = cur.as_mut().expect("checked above");
                        p.spans.push((off, l));
                        p.len += l;
                    } else {
                        if let Some(p) = cur.take() {
                            st.queue.push_back(p);
                            n += 1;
                        }
                        cur = Some(Piece {
                            chunk: c,
                            item: plan.item,
                            shard: seg.shard,
                            spans: vec![(off, l)],
                            dst,
                            len: l,
                            scale_dst,
                            row,
                        });
                    }
                    off += l;
                    match quant {
                        Some((q, _, _)) => {
                            let rows = l / q.row_bytes();
                            dst += rows * q.cols;
                            scale_at += rows * q.elem_bytes();
                        }
                        None => dst += l,
                    }
                    left -= l;
                    todo -= l;
                }
            }
            if let Some(p) = cur.take() {
                st.queue.push_back(p);
                n += 1;
            }
            if n == 0 {
                st.times[c][1] = st.times[c][0]; // nothing to read
            }
            st.remaining[c] = n;
            st.pieces += n as u64;
        }
    }

    /// The read-ahead thread ([`ReaderConfig::read_ahead_bytes`]): asks the page cache for
    /// the items' file ranges in plan order, in steps of [`READ_AHEAD_STEP`], never more
    /// than the window (in the items' source bytes, a range's gaps not counted) past the
    /// source bytes given to the threads so far; returns when all are asked for or the
    /// reader stops.
    fn read_ahead(&self) {
        let window = self.cfg.read_ahead_bytes;
        for (shard, offset, len, src_before, src) in file_ranges(&self.items) {
            let mut at = 0;
            while at < len {
                // where this step starts, in source bytes (a joined range's gaps spread evenly)
                let pos = src_before + (u128::from(at) * u128::from(src) / u128::from(len)) as u64;
                loop {
                    if self.lock().stopped {
                        return;
                    }
                    if pos
                        < self
                            .allocated_src
                            .load(Ordering::Acquire)
                            .saturating_add(window)
                    {
                        break;
                    }
                    std::thread::sleep(READ_AHEAD_POLL);
                }
                let n = (len - at).min(READ_AHEAD_STEP);
                self.ckpt.shards[shard].will_need(offset + at, n);
                at += n;
            }
        }
    }

    fn work(&self) {
        let mut scratch: Vec<u8> = Vec::new();
        let mut st = self.lock();
        loop {
            if st.stopped {
                return;
            }
            if st.queue.is_empty() {
                self.fill(&mut st);
            }
            let Some(p) = st.queue.pop_front() else {
                // chunks left to allocate: the ring is full, only a release makes room
                let for_room =
                    st.next_alloc < st.chunks.len() || st.quantized.len() < self.items.len();
                if for_room {
                    st.accrue();
                    st.room_waiters += 1;
                }
                st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
                if for_room {
                    st.accrue();
                    st.room_waiters -= 1;
                }
                continue;
            };
            drop(st);
            let started = Instant::now();
            let item = &self.items[p.item];
            let shard = &self.ckpt.shards[p.shard];
            let (res, finite) = match (item.quant, p.scale_dst) {
                (Some(q), Some(scale_dst)) => {
                    let rows = p.len / q.row_bytes();
                    // SAFETY: [p.dst, p.dst + rows * cols) and [scale_dst, scale_dst + rows *
                    // elem) lie inside the ring region reserved for this chunk alone, disjoint
                    // from every other piece's (fill lays pieces out back to back), and the
                    // buffer outlives the threads (DestBuffer::new's contract; Drop joins them).
                    let (qdst, sdst) = unsafe {
                        (
                            std::slice::from_raw_parts_mut(
                                self.buf.ptr.add(p.dst as usize),
                                (rows * q.cols) as usize,
                            ),
                            std::slice::from_raw_parts_mut(
                                self.buf.ptr.add(scale_dst as usize),
                                (rows * q.elem_bytes()) as usize,
                            ),
                        )
                    };
                    let mut quantize = |src: &[u8]| match &item.amax {
                        Some(a) => {
                            let r = p.row as usize;
                            let amax = &a[r..r + rows as usize];
                            quantize_rows_with_amax(&q, src, amax, qdst, sdst)
                        }
                        None => quantize_rows(&q, src, qdst, sdst),
                    };
                    let (offset, _) = p.spans[0];
                    let res = if p.spans.len() > 1 {
                        // rows of several segments, gathered (one mapping of their span
                        // populated and dropped, or one read a segment)
                        scratch.resize(p.len as usize, 0);
                        shard
                            .read_spans_into(&p.spans, &mut scratch, self.cfg.method, &item.name)
                            .map(|()| quantize(&scratch))
                    } else if self.cfg.method == ReadMethod::Mmap {
                        // Straight from the page cache: no copy into scratch.
                        shard.with_mapped(offset, p.len as usize, &item.name, quantize)
                    } else {
                        scratch.resize(p.len as usize, 0);
                        shard
                            .read_into(offset, &mut scratch, self.cfg.method, &item.name)
                            .map(|()| quantize(&scratch))
                    };
                    // the scales just written, still in this core's cache
                    let finite = res.is_err() || quant::scales_finite(q.dtype, sdst);
                    (res, finite)
                }
                _ => {
                    // SAFETY: [p.dst, p.dst + p.len) lies inside a ring region reserved for
                    // this chunk alone (the ring never overlaps live regions and pieces of a
                    // chunk are disjoint), and the buffer outlives the threads
                    // (DestBuffer::new's contract; Drop joins them).
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            self.buf.ptr.add(p.dst as usize),
                            p.len as usize,
                        )
                    };
                    let res = if let [(offset, _)] = p.spans[..] {
                        shard.read_into(offset, dst, self.cfg.method, &item.name)
                    } else {
                        shard.read_spans_into(&p.spans, dst, self.cfg.method, &item.name)
                    };
                    (res, true)
                }
            };
            let ps = started.elapsed().as_nanos() as f64 * 1000.0 / p.len.max(1) as f64;
            st = self.lock();
            match res {
                Ok(()) => {
                    let avg = if p.scale_dst.is_some() {
                        &mut st.quant_ps
                    } else {
                        &mut st.read_ps
                    };
                    *avg = Some(avg.map_or(ps, |a| a + COST_EWMA * (ps - a)));
                    st.bytes_read += p.len;
                    if !finite && !st.non_finite.contains(&p.item) {
                        st.non_finite.push(p.item);
                    }
                    st.remaining[p.chunk] -= 1;
                    if st.remaining[p.chunk] == 0 {
                        st.times[p.chunk][1] = st.now_ns();
                        self.cv.notify_all();
                    }
                }
                Err(e) => {
                    if st.error.is_none() && !st.failed {
                        st.error = Some(e);
                    }
                    st.failed = true;
                    st.stopped = true;
                    st.queue.clear();
                    self.cv.notify_all();
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{file_ranges, quantize_balances, PlannedBytes};
    use crate::plan::{ReadItem, Segment};

    fn item(segments: &[(usize, u64, u64)]) -> ReadItem {
        ReadItem {
            name: "t".into(),
            segments: segments
                .iter()
                .map(|&(shard, offset, len)| Segment { shard, offset, len })
                .collect(),
            quant: None,
            amax: None,
            optional: false,
            background: false,
        }
    }

    /// A column slice (one range a row, the other ranks' columns between) is asked for as
    /// one range, and its place in the plan counts only its own bytes: the read-ahead's
    /// window is in the bytes the threads are given, so it never runs behind them.
    #[test]
    fn read_ahead_ranges_join_a_slice_and_count_its_own_bytes() {
        let rows = item(&[(0, 100, 8), (0, 116, 8), (0, 132, 8)]);
        let far = item(&[(0, 100 + (4 << 20), 10), (1, 0, 0), (1, 50, 5)]);
        assert_eq!(
            file_ranges(&[rows, far]),
            vec![
                (0, 100, 40, 0, 24),
                (0, 100 + (4 << 20), 10, 24, 10),
                (1, 50, 5, 34, 5)
            ]
        );
    }

    const EMPTY: PlannedBytes = PlannedBytes {
        plain: 0.0,
        host: 0.0,
        host_out: 0.0,
    };

    #[test]
    fn the_side_that_ends_the_plan_sooner_takes_the_item() {
        // 16 threads reading 4 GB/s each (250 ps a byte), quantizing 2.5 GB/s (400 ps), a
        // 50 GB/s bus (20 ps a byte): one thread-byte of reading is 250 / 16 = 15.6 ps of
        // the plan, the bus 20: the bus is the slower side, and FP8 halves its share
        let fits =
            |plan: &PlannedBytes| quantize_balances(plan, 1e8, 0.5e8, 250.0, 400.0, 20.0, 16.0);
        // the first item alone: the bus carries it in 2.0 ms plain, the threads quantize it
        // in 2.5: plain
        assert!(!fits(&EMPTY));
        // behind 1 GB read plain (the bus 20 ms, the threads 15.6): quantized
        let behind = PlannedBytes {
            plain: 1e9,
            ..EMPTY
        };
        assert!(fits(&behind));
        // once a third of the bytes is quantized, the threads are the slower side
        let third = PlannedBytes {
            plain: 2e9,
            host: 1e9,
            host_out: 0.5e9,
        };
        assert!(!fits(&third));
        // the threads alone faster than the bus even quantizing everything: all quantized
        let fast =
            |plan: &PlannedBytes| quantize_balances(plan, 1e8, 0.5e8, 50.0, 100.0, 20.0, 16.0);
        assert!(fast(&PlannedBytes {
            plain: 0.0,
            host: 1e10,
            host_out: 0.5e10
        }));
        // a free bus: only the threads' work counts, and quantizing adds to it
        assert!(!quantize_balances(
            &EMPTY, 1e8, 0.5e8, 250.0, 400.0, 0.0, 16.0
        ));
        // an fp32 source: a quarter of the bytes cross the bus
        assert!(quantize_balances(
            &behind, 1e8, 0.25e8, 250.0, 400.0, 20.0, 16.0
        ));
    }

    #[test]
    fn the_balance_holds_the_split_near_the_point_where_both_sides_end_together() {
        // deciding 1,000 equal items one by one: the share quantized ends near the x where
        // (1 - x) 250 + x 400 = 16 * 20 (1 - x / 2), x = (320 - 250) / (150 + 160) = 0.226
        let mut plan = EMPTY;
        let mut quantized = 0;
        for _ in 0..1000 {
            if quantize_balances(&plan, 1e8, 0.5e8, 250.0, 400.0, 20.0, 16.0) {
                plan.host += 1e8;
                plan.host_out += 0.5e8;
                quantized += 1;
            } else {
                plan.plain += 1e8;
            }
        }
        assert!((220..=232).contains(&quantized), "{quantized} of 1000");
    }
}
