//! The private module `fastfp8._native`: PyO3 bindings of fastfp8-core, and the one place
//! where core errors become Python exceptions (classes defined in `fastfp8.errors`).

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fastfp8_core::amax::row_amax;
use fastfp8_core::plan::{ReadItem, Segment};
use fastfp8_core::quant::{quantize_rows as quantize_rows_core, QuantSpec, Rounding};
use fastfp8_core::reader::{default_threads, DestBuffer, Next, Reader, ReaderConfig};
use fastfp8_core::{Checkpoint, Dtype, Error, ErrorKind, ReadMethod};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyType};

/// How long one wait for the next chunk lasts before Python checks for signals (Ctrl-C).
const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// The Python class of each error kind: a class name in `fastfp8.errors`, or `ValueError`.
/// Exhaustive on purpose: a new kind does not compile until it has its class.
fn class_name(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::Header => "HeaderError",
        ErrorKind::Checkpoint => "CheckpointError",
        ErrorKind::NotFound => "CheckpointNotFoundError",
        ErrorKind::Read => "ReadError",
        ErrorKind::Budget => "BudgetError",
        ErrorKind::Cancelled => "CancelledError",
        ErrorKind::Release => "ReleaseError",
        ErrorKind::Invalid => "ValueError",
    }
}

fn to_pyerr(py: Python<'_>, err: Error) -> PyErr {
    let msg = err.to_string();
    let class = class_name(err.kind());
    if class == "ValueError" {
        return PyValueError::new_err(msg);
    }
    let ty = py
        .import("fastfp8.errors")
        .and_then(|m| m.getattr(class))
        .and_then(|c| c.cast_into::<PyType>().map_err(PyErr::from));
    match ty {
        Ok(ty) => PyErr::from_type(ty, msg),
        Err(_) => PyRuntimeError::new_err(msg),
    }
}

/// `[(kind, class name)]` for every error kind of the core (for the mapping test).
#[pyfunction]
fn error_classes() -> Vec<(&'static str, &'static str)> {
    ErrorKind::ALL
        .iter()
        .map(|&k| (k.name(), class_name(k)))
        .collect()
}

fn method_from(name: &str) -> PyResult<ReadMethod> {
    match name {
        "pread" => Ok(ReadMethod::Pread),
        "mmap" => Ok(ReadMethod::Mmap),
        "direct" => Ok(ReadMethod::Direct),
        other => Err(PyValueError::new_err(format!(
            "read method must be 'pread', 'mmap' or 'direct', not {other:?}"
        ))),
    }
}

/// An opened, validated checkpoint (a file or a model directory).
#[pyclass(frozen, name = "Checkpoint", module = "fastfp8._native")]
struct PyCheckpoint {
    inner: Arc<Checkpoint>,
}

/// One shard of a checkpoint.
#[pyclass(frozen, get_all, name = "ShardInfo", module = "fastfp8._native")]
struct PyShardInfo {
    /// The shard's path.
    path: PathBuf,
    /// Its size in bytes when opened.
    size: u64,
    /// Absolute file offset of its data section.
    data_start: u64,
}

/// One tensor of a checkpoint, with absolute file offsets.
#[pyclass(frozen, get_all, name = "TensorEntry", module = "fastfp8._native")]
struct PyTensorEntry {
    name: String,
    /// The safetensors dtype name (`"BF16"`, ...).
    dtype: String,
    shape: Vec<u64>,
    /// Index into `Checkpoint.shards()`.
    shard: usize,
    /// Absolute file offsets `[begin, end)`.
    begin: u64,
    end: u64,
}

/// A reader's figures.
#[pyclass(frozen, get_all, name = "ReaderStats", module = "fastfp8._native")]
struct PyReaderStats {
    budget: u64,
    peak_in_flight: u64,
    bytes_read: u64,
    threads: usize,
    room_wait_ns: u64,
}

#[pymethods]
impl PyCheckpoint {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let ckpt = py
            .detach(|| Checkpoint::open(&path))
            .map_err(|e| to_pyerr(py, e))?;
        Ok(PyCheckpoint {
            inner: Arc::new(ckpt),
        })
    }

    #[getter]
    fn root(&self) -> PathBuf {
        self.inner.root.clone()
    }

    #[getter]
    fn index(&self) -> Option<PathBuf> {
        self.inner.index.clone()
    }

    /// The share of the shards' bytes in the page cache, estimated from `samples` pages per
    /// shard; None where the kernel or file system cannot say. Runs without the GIL.
    #[pyo3(signature = (samples=64))]
    fn cached_fraction(&self, py: Python<'_>, samples: u64) -> Option<f64> {
        let ckpt = Arc::clone(&self.inner);
        py.detach(move || ckpt.cached_fraction(samples))
    }

    /// One `ShardInfo` per shard.
    fn shards(&self) -> Vec<PyShardInfo> {
        self.inner
            .shards
            .iter()
            .map(|s| PyShardInfo {
                path: s.path.clone(),
                size: s.size,
                data_start: s.header.data_start,
            })
            .collect()
    }

    /// Every tensor, shard by shard, in header order.
    fn tensors(&self) -> Vec<PyTensorEntry> {
        let c = &self.inner;
        c.tensors
            .iter()
            .map(|&r| {
                let t = c.info(r);
                let start = c.shards[r.shard].header.data_start;
                PyTensorEntry {
                    name: t.name.clone(),
                    dtype: t.dtype.to_string(),
                    shape: t.shape.clone(),
                    shard: r.shard,
                    begin: start + t.begin,
                    end: start + t.end,
                }
            })
            .collect()
    }

    /// The descriptor of shard `shard` as opened and validated: the same file even after
    /// its path was replaced (by a rename). Valid while this object lives; map it (mmap
    /// duplicates it), never close it.
    fn fileno(&self, shard: usize) -> PyResult<i32> {
        let s =
            self.inner.shards.get(shard).ok_or_else(|| {
                PyValueError::new_err(format!("shard index {shard} out of range"))
            })?;
        Ok(s.file().as_raw_fd())
    }

    /// The `__metadata__` of shard `shard`, or None.
    fn metadata<'py>(&self, py: Python<'py>, shard: usize) -> PyResult<Option<Bound<'py, PyDict>>> {
        let s =
            self.inner.shards.get(shard).ok_or_else(|| {
                PyValueError::new_err(format!("shard index {shard} out of range"))
            })?;
        match &s.header.metadata {
            None => Ok(None),
            Some(m) => {
                let d = PyDict::new(py);
                for (k, v) in m {
                    d.set_item(k, v)?;
                }
                Ok(Some(d))
            }
        }
    }

    /// The amax of every row of `items` (each `(name, segments, (dtype, cols, rounding))`,
    /// whole rows), item after item, as little-endian f32 bytes; a row holding NaN or Inf
    /// gives +Inf. Read on `threads` native threads (default: as the reader) without the
    /// GIL.
    #[pyo3(signature = (items, *, threads=None, method="mmap"))]
    fn row_amax<'py>(
        &self,
        py: Python<'py>,
        items: Vec<ItemSpec>,
        threads: Option<usize>,
        method: &str,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let items = parse_items(items)?;
        let method = method_from(method)?;
        let threads = threads.unwrap_or_else(default_threads);
        let ckpt = &self.inner;
        let amax = py
            .detach(|| row_amax(ckpt, &items, threads, method))
            .map_err(|e| to_pyerr(py, e))?;
        let bytes: Vec<u8> = amax.iter().flat_map(|v| v.to_le_bytes()).collect();
        Ok(PyBytes::new(py, &bytes))
    }

    /// Errors if shard `shard` no longer has the size it had when opened.
    fn check_unchanged(&self, py: Python<'_>, shard: usize) -> PyResult<()> {
        let s =
            self.inner.shards.get(shard).ok_or_else(|| {
                PyValueError::new_err(format!("shard index {shard} out of range"))
            })?;
        s.check_unchanged().map_err(|e| to_pyerr(py, e))
    }
}

/// A running read of planned byte ranges into a caller-owned buffer.
///
/// `buffer` is any object that owns the memory at `[ptr, ptr + nbytes)` (a pinned torch
/// tensor); the reader keeps it alive and joins its threads before letting it go.
#[pyclass(frozen, name = "Reader", module = "fastfp8._native")]
struct PyReader {
    // Declared first so that it is dropped (threads joined) before the buffer.
    reader: Mutex<Option<Arc<Reader>>>,
    /// Let go by `close` once the threads are joined (so that the memory can be freed while
    /// this object lives on).
    buffer: Mutex<Option<Py<PyAny>>>,
}

/// A segment as Python passes it: `(shard, offset, len)`, or `(shard, offset, len, count,
/// stride)` for `count` ranges of `len` bytes, `stride` bytes apart (a row-parallel slice:
/// one range per row, described in one tuple instead of one per row).
#[derive(FromPyObject)]
enum SegSpec {
    Plain(usize, u64, u64),
    Strided(usize, u64, u64, u64, u64),
}

/// An item as Python passes it: `(name, segments)`, or `(name, segments, (dtype, cols,
/// rounding))` to quantize its rows on the way (dtype "BF16", "F16" or "F32"; rounding
/// "fp32" or "eager"), or `(name, segments, (dtype, cols, rounding), amax)` with a given
/// amax per row (floats; a row-parallel slice's, all-reduced over the ranks).
#[derive(FromPyObject)]
enum ItemSpec {
    Plain(String, Vec<SegSpec>),
    Quant(String, Vec<SegSpec>, (String, u64, String)),
    QuantAmax(String, Vec<SegSpec>, (String, u64, String), Vec<f32>),
}

/// The core's items; a bad spec or an oversized strided segment is a `ValueError` naming
/// the tensor.
fn parse_items(items: Vec<ItemSpec>) -> PyResult<Vec<ReadItem>> {
    let mut parsed = Vec::with_capacity(items.len());
    for item in items {
        let (name, segs, quant, amax) = match item {
            ItemSpec::Plain(name, segs) => (name, segs, None, None),
            ItemSpec::Quant(name, segs, q) => (name, segs, Some(q), None),
            ItemSpec::QuantAmax(name, segs, q, amax) => (name, segs, Some(q), Some(amax)),
        };
        let quant = match quant {
            Some((dtype, cols, rounding)) => Some(
                quant_spec(&dtype, cols, &rounding)
                    .map_err(|e| PyValueError::new_err(format!("{name}: {e}")))?,
            ),
            None => None,
        };
        for seg in &segs {
            if let SegSpec::Strided(_, _, len, count, _) = seg {
                // every range is checked against its shard once expanded; bound the
                // expansion itself by what a shard can hold
                if *count > 1 << 32 || (*len == 0 && *count > 1) {
                    return Err(PyValueError::new_err(format!(
                        "{name}: a strided segment of {count} ranges of {len} bytes"
                    )));
                }
            }
        }
        let segments = segs
            .into_iter()
            .flat_map(|seg| {
                let (shard, offset, len, count, stride) = match seg {
                    SegSpec::Plain(shard, offset, len) => (shard, offset, len, 1, 0),
                    SegSpec::Strided(shard, offset, len, count, stride) => {
                        (shard, offset, len, count, stride)
                    }
                };
                (0..count).map(move |i| Segment {
                    shard,
                    offset: offset.saturating_add(i.saturating_mul(stride)),
                    len,
                })
            })
            .collect();
        parsed.push(ReadItem {
            name,
            segments,
            quant,
            amax,
            optional: false,
            background: false,
        });
    }
    Ok(parsed)
}

/// `set` on the items at `indices` (`what` names the flag in the `ValueError` for an index
/// out of range).
fn flag_items(
    items: &mut [ReadItem],
    indices: Vec<usize>,
    what: &str,
    set: fn(&mut ReadItem),
) -> PyResult<()> {
    let n = items.len();
    for i in indices {
        let item = items.get_mut(i).ok_or_else(|| {
            PyValueError::new_err(format!("{what} item {i} out of range ({n} items)"))
        })?;
        set(item);
    }
    Ok(())
}

fn quant_spec(dtype: &str, cols: u64, rounding: &str) -> PyResult<QuantSpec> {
    let d: Dtype = dtype
        .parse()
        .map_err(|()| PyValueError::new_err(format!("unknown dtype {dtype:?}")))?;
    let r = match rounding {
        "fp32" => Rounding::Fp32,
        "eager" => Rounding::Eager,
        other => {
            return Err(PyValueError::new_err(format!(
                "rounding must be 'fp32' or 'eager', not {other:?}"
            )))
        }
    };
    QuantSpec::new(d, cols, r).map_err(|e| PyValueError::new_err(e.to_string()))
}

/// `(item, src_len, alloc_ns, read_ns, deliver_ns, release_ns)` ([`PyReader::chunk_times`]).
type ChunkTimesTuple = (usize, u64, u64, u64, u64, u64);

#[pymethods]
impl PyReader {
    #[new]
    #[pyo3(signature = (checkpoint, items, buffer, ptr, nbytes, *, chunk_bytes=None, threads=None, piece_bytes=4 << 20, method="mmap", merge_bytes=0, optional=Vec::new(), bus_bytes_per_s=0.0, read_ahead_bytes=0, background=Vec::new()))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        checkpoint: &PyCheckpoint,
        items: Vec<ItemSpec>,
        buffer: Py<PyAny>,
        ptr: usize,
        nbytes: u64,
        chunk_bytes: Option<u64>,
        threads: Option<usize>,
        piece_bytes: u64,
        method: &str,
        merge_bytes: u64,
        optional: Vec<usize>,
        bus_bytes_per_s: f64,
        read_ahead_bytes: u64,
        background: Vec<usize>,
    ) -> PyResult<Self> {
        if ptr == 0 && nbytes > 0 {
            return Err(PyValueError::new_err("buffer pointer is null"));
        }
        if !bus_bytes_per_s.is_finite() || bus_bytes_per_s < 0.0 {
            return Err(PyValueError::new_err(format!(
                "bus_bytes_per_s must be a finite rate >= 0, got {bus_bytes_per_s}"
            )));
        }
        let mut items = parse_items(items)?;
        flag_items(&mut items, optional, "optional", |it| it.optional = true)?;
        flag_items(&mut items, background, "background", |it| {
            it.background = true
        })?;
        let cfg = ReaderConfig {
            threads: threads.unwrap_or_else(default_threads),
            chunk_bytes,
            piece_bytes,
            method: method_from(method)?,
            merge_bytes,
            bus_bytes_per_s,
            read_ahead_bytes,
        };
        // SAFETY: the caller passes the address and size of memory owned by `buffer`, which
        // this object keeps alive until `close` has joined the threads; `reader` is declared
        // before `buffer`, so on drop the reader (and its threads, joined in its Drop) goes
        // first. The Python wrapper reads a region only
        // between its delivery and its release.
        let dest = unsafe { DestBuffer::new(ptr as *mut u8, nbytes) };
        let ckpt = Arc::clone(&checkpoint.inner);
        let reader = Reader::start(ckpt, items, dest, cfg).map_err(|e| to_pyerr(py, e))?;
        Ok(PyReader {
            reader: Mutex::new(Some(Arc::new(reader))),
            buffer: Mutex::new(Some(buffer)),
        })
    }

    /// The next chunk as `(item, item_offset, buf_offset, len)`, or None at the end.
    /// Waits without the GIL; Ctrl-C interrupts it and stops the threads.
    fn next(&self, py: Python<'_>) -> PyResult<Option<(usize, u64, u64, u64)>> {
        let reader = self.get()?;
        loop {
            let r = Arc::clone(&reader);
            match py.detach(move || r.next_timeout(SIGNAL_POLL)) {
                Ok(Next::Ready(d)) => {
                    return Ok(Some((d.item, d.item_offset, d.buf_offset, d.len)))
                }
                Ok(Next::Done) => return Ok(None),
                Ok(Next::Pending) => {
                    if let Err(e) = py.check_signals() {
                        reader.cancel();
                        return Err(e);
                    }
                }
                Err(e) => return Err(to_pyerr(py, e)),
            }
        }
    }

    /// Gives a delivered chunk's region back: exactly the `buf_offset` and `len` of a chunk
    /// `next()` delivered and not released yet, else `ReleaseError` (nothing is freed).
    fn release(&self, py: Python<'_>, buf_offset: u64, len: u64) -> PyResult<()> {
        self.get()?
            .release(buf_offset, len)
            .map_err(|e| to_pyerr(py, e))
    }

    /// Stops the threads and waits for them, always, even while another thread is inside
    /// `next()` (which then raises `CancelledError`): afterwards no thread writes to the
    /// buffer. Idempotent.
    fn close(&self, py: Python<'_>) {
        let taken = self.reader.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(r) = taken {
            py.detach(move || r.close());
        }
        // The threads are joined: nothing writes to the buffer any more.
        let buffer = self.buffer.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(buffer);
    }

    /// Stops the threads without waiting for them; `next()` then raises `CancelledError`.
    fn cancel(&self) -> PyResult<()> {
        self.get()?.cancel();
        Ok(())
    }

    /// Reader threads still running (0 once `close()` has returned).
    fn live_threads(&self) -> usize {
        match self
            .reader
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            Some(r) => r.live_threads(),
            None => 0,
        }
    }

    /// Whether item `item` is read quantized on the way: as given, or for an optional item
    /// as the reader decided on reaching it (None until then; before its first delivery).
    fn quantized(&self, item: usize) -> PyResult<Option<bool>> {
        Ok(self.get()?.quantized(item))
    }

    /// The items quantized on the way that hold NaN or Inf (a NaN scale), in plan order.
    fn non_finite(&self) -> PyResult<Vec<usize>> {
        Ok(self.get()?.non_finite())
    }

    /// `(item, src_len, alloc_ns, read_ns, deliver_ns, release_ns)` of each chunk planned so
    /// far, in plan order (ns since the reader started; 0: not yet).
    fn chunk_times(&self) -> PyResult<Vec<ChunkTimesTuple>> {
        Ok(self
            .get()?
            .chunk_times()
            .into_iter()
            .map(|t| {
                (
                    t.item,
                    t.src_len,
                    t.alloc_ns,
                    t.read_ns,
                    t.deliver_ns,
                    t.release_ns,
                )
            })
            .collect())
    }

    fn stats(&self) -> PyResult<PyReaderStats> {
        let s = self.get()?.stats();
        Ok(PyReaderStats {
            budget: s.budget,
            peak_in_flight: s.peak_in_flight,
            bytes_read: s.bytes_read,
            threads: s.threads,
            room_wait_ns: s.room_wait_ns,
        })
    }
}

impl PyReader {
    fn get(&self) -> PyResult<Arc<Reader>> {
        self.reader
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| PyValueError::new_err("the reader is closed"))
    }
}

/// The default number of reader threads on this machine.
/// Quantizes whole rows of `src` (little-endian `dtype`) as the reader does on the way:
/// returns `(e4m3 bytes, scales)`. For tests and benchmarks; runs without the GIL.
#[pyfunction]
#[pyo3(signature = (src, dtype, cols, rounding="fp32"))]
fn quantize_rows<'py>(
    py: Python<'py>,
    src: &[u8],
    dtype: &str,
    cols: u64,
    rounding: &str,
) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
    let spec = quant_spec(dtype, cols, rounding)?;
    if !(src.len() as u64).is_multiple_of(spec.row_bytes()) {
        return Err(PyValueError::new_err(format!(
            "{} bytes are not whole rows of {} bytes",
            src.len(),
            spec.row_bytes()
        )));
    }
    let rows = src.len() as u64 / spec.row_bytes();
    let mut q = vec![0u8; (rows * spec.cols) as usize];
    let mut s = vec![0u8; (rows * spec.elem_bytes()) as usize];
    py.detach(|| quantize_rows_core(&spec, src, &mut q, &mut s));
    Ok((PyBytes::new(py, &q), PyBytes::new(py, &s)))
}

#[pyfunction]
fn default_thread_count() -> usize {
    default_threads()
}

/// The code path of host quantization on this CPU (`"avx512vbmi"`, `"avx512"`, `"avx2"`
/// or `"generic"`).
#[pyfunction]
fn quant_isa() -> &'static str {
    fastfp8_core::quant::isa_name()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyCheckpoint>()?;
    m.add_class::<PyReader>()?;
    m.add_class::<PyShardInfo>()?;
    m.add_class::<PyTensorEntry>()?;
    m.add_class::<PyReaderStats>()?;
    m.add_function(wrap_pyfunction!(default_thread_count, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_rows, m)?)?;
    m.add_function(wrap_pyfunction!(quant_isa, m)?)?;
    m.add_function(wrap_pyfunction!(error_classes, m)?)?;
    m.add("MAX_HEADER_LEN", fastfp8_core::header::MAX_HEADER_LEN)?;
    Ok(())
}
