//! The private module `fastfp8._native`: PyO3 bindings of fastfp8-core, and the one place
//! where core errors become Python exceptions (classes defined in `fastfp8.errors`).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fastfp8_core::plan::{ReadItem, Segment};
use fastfp8_core::reader::{default_threads, DestBuffer, Next, Reader, ReaderConfig};
use fastfp8_core::{Checkpoint, Error, ErrorKind, ReadMethod};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyType};

/// How long one wait for the next chunk lasts before Python checks for signals (Ctrl-C).
const SIGNAL_POLL: Duration = Duration::from_millis(50);

fn to_pyerr(py: Python<'_>, err: Error) -> PyErr {
    let msg = err.to_string();
    let class = match err.kind() {
        ErrorKind::Header => "HeaderError",
        ErrorKind::Checkpoint => "CheckpointError",
        ErrorKind::NotFound => "CheckpointNotFoundError",
        ErrorKind::Read => "ReadError",
        ErrorKind::Budget => "BudgetError",
        ErrorKind::Cancelled => "CancelledError",
        ErrorKind::Invalid => return PyValueError::new_err(msg),
    };
    let ty = py
        .import("fastfp8.errors")
        .and_then(|m| m.getattr(class))
        .and_then(|c| c.cast_into::<PyType>().map_err(PyErr::from));
    match ty {
        Ok(ty) => PyErr::from_type(ty, msg),
        Err(_) => PyRuntimeError::new_err(msg),
    }
}

fn method_from(name: &str) -> PyResult<ReadMethod> {
    match name {
        "pread" => Ok(ReadMethod::Pread),
        "mmap" => Ok(ReadMethod::Mmap),
        other => Err(PyValueError::new_err(format!(
            "read method must be 'pread' or 'mmap', not {other:?}"
        ))),
    }
}

/// An opened, validated checkpoint (a file or a model directory).
#[pyclass(frozen, name = "Checkpoint", module = "fastfp8._native")]
struct PyCheckpoint {
    inner: Arc<Checkpoint>,
}

type TensorRow = (String, String, Vec<u64>, usize, u64, u64);

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

    /// `[(path, size, data_start)]`, one per shard.
    fn shards(&self) -> Vec<(PathBuf, u64, u64)> {
        self.inner
            .shards
            .iter()
            .map(|s| (s.path.clone(), s.size, s.header.data_start))
            .collect()
    }

    /// `[(name, dtype, shape, shard, file_begin, file_end)]` with absolute file offsets.
    fn tensors(&self) -> Vec<TensorRow> {
        let c = &self.inner;
        c.tensors
            .iter()
            .map(|&r| {
                let t = c.info(r);
                let start = c.shards[r.shard].header.data_start;
                (
                    t.name.clone(),
                    t.dtype.to_string(),
                    t.shape.clone(),
                    r.shard,
                    start + t.begin,
                    start + t.end,
                )
            })
            .collect()
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
    _buffer: Py<PyAny>,
}

/// A segment as Python passes it: `(shard, offset, len)`, or `(shard, offset, len, count,
/// stride)` for `count` ranges of `len` bytes, `stride` bytes apart (a row-parallel slice:
/// one range per row, described in one tuple instead of one per row).
#[derive(FromPyObject)]
enum SegSpec {
    Plain(usize, u64, u64),
    Strided(usize, u64, u64, u64, u64),
}

type ItemSpec = (String, Vec<SegSpec>);

#[pymethods]
impl PyReader {
    #[new]
    #[pyo3(signature = (checkpoint, items, buffer, ptr, nbytes, *, chunk_bytes=None, threads=None, piece_bytes=4 << 20, method="mmap"))]
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
    ) -> PyResult<Self> {
        if ptr == 0 && nbytes > 0 {
            return Err(PyValueError::new_err("buffer pointer is null"));
        }
        for (name, segs) in &items {
            for seg in segs {
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
        }
        let items = items
            .into_iter()
            .map(|(name, segs)| ReadItem {
                name,
                segments: segs
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
                    .collect(),
            })
            .collect();
        let cfg = ReaderConfig {
            threads: threads.unwrap_or_else(default_threads),
            chunk_bytes,
            piece_bytes,
            method: method_from(method)?,
        };
        // SAFETY: the caller passes the address and size of memory owned by `buffer`, which
        // this object keeps alive; `reader` is declared before `_buffer`, so the reader (and
        // its threads, joined in its Drop) goes first. The Python wrapper reads a region only
        // between its delivery and its release.
        let dest = unsafe { DestBuffer::new(ptr as *mut u8, nbytes) };
        let ckpt = Arc::clone(&checkpoint.inner);
        let reader = Reader::start(ckpt, items, dest, cfg).map_err(|e| to_pyerr(py, e))?;
        Ok(PyReader {
            reader: Mutex::new(Some(Arc::new(reader))),
            _buffer: buffer,
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

    /// Gives a delivered chunk's region back.
    fn release(&self, py: Python<'_>, buf_offset: u64, len: u64) -> PyResult<()> {
        self.get()?
            .release(buf_offset, len)
            .map_err(|e| to_pyerr(py, e))
    }

    /// Stops the threads and waits for them; the buffer is free afterwards. Idempotent.
    fn close(&self, py: Python<'_>) {
        let taken = self.reader.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(r) = taken {
            r.cancel();
            py.detach(move || drop(r));
        }
    }

    /// `{"budget", "peak_in_flight", "bytes_read", "threads"}`.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.get()?.stats();
        let d = PyDict::new(py);
        d.set_item("budget", s.budget)?;
        d.set_item("peak_in_flight", s.peak_in_flight)?;
        d.set_item("bytes_read", s.bytes_read)?;
        d.set_item("threads", s.threads)?;
        Ok(d)
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
#[pyfunction]
fn default_thread_count() -> usize {
    default_threads()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyCheckpoint>()?;
    m.add_class::<PyReader>()?;
    m.add_function(wrap_pyfunction!(default_thread_count, m)?)?;
    m.add("MAX_HEADER_LEN", fastfp8_core::header::MAX_HEADER_LEN)?;
    Ok(())
}
