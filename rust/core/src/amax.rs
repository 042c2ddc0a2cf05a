//! The per-row absolute maxima of read items, straight from the checkpoint, on native
//! threads: the first pass of host quantization for tensor-parallel row slices.
//!
//! Each rank of a row-parallel layer holds some columns of every row (one strided range
//! per row), and a row's scale comes from its amax over every rank. [`row_amax`] reads the
//! rank's ranges and returns the amax of each row's slice ([`crate::quant::rows_amax`]);
//! the caller all-reduces them (MAX) and hands them back to the reader with the items
//! ([`crate::plan::ReadItem::amax`]), whose threads then quantize the rows with them.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::plan::{validate, ReadItem};
use crate::quant::rows_amax;
use crate::shard::ReadMethod;

/// The most source bytes one thread reads (and scans) at a time (at least one row).
const TASK_BYTES: u64 = 1 << 20;

/// The largest gap between two rows of one task: past it they are separate tasks.
const MAX_GAP: u64 = 1 << 20;

/// One thread's unit of work: whole rows of one item in one shard.
#[derive(Debug)]
struct Task {
    item: usize,
    shard: usize,
    /// (file offset, length): whole rows, in item order
    spans: Vec<(u64, u64)>,
    /// index of its first row in the output
    out: usize,
    rows: usize,
}

/// The amax of every row of `items` (each with a quantization spec, whose dtype and
/// columns give the rows; every segment whole rows), item after item, as f32: a row holding
/// NaN or Inf gives +Inf (see [`rows_amax`]). Reads with `threads` threads (at least one)
/// and `method`; an error names the tensor.
pub fn row_amax(
    ckpt: &Checkpoint,
    items: &[ReadItem],
    threads: usize,
    method: ReadMethod,
) -> Result<Vec<f32>> {
    if let Some(item) = items.iter().find(|i| i.quant.is_none()) {
        return Err(Error::Invalid(format!(
            "{}: a row amax needs the rows' dtype and columns",
            item.name
        )));
    }
    if items.iter().any(|i| i.amax.is_some()) {
        return Err(Error::Invalid("row amax items take no given amax".into()));
    }
    validate(ckpt, items)?;
    let (tasks, total) = tasks(items);
    let mut out = vec![0f32; total];
    if tasks.is_empty() {
        return Ok(out);
    }
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let results = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads.clamp(1, tasks.len()))
            .map(|_| s.spawn(|| work(ckpt, items, &tasks, method, &next, &failed)))
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a row amax thread panicked"))
            .collect::<Vec<_>>()
    });
    for r in results {
        for (at, values) in r? {
            out[at..at + values.len()].copy_from_slice(&values);
        }
    }
    Ok(out)
}

/// The tasks of `items` and the number of rows in all.
fn tasks(items: &[ReadItem]) -> (Vec<Task>, usize) {
    let mut tasks: Vec<Task> = Vec::new();
    let mut out = 0usize;
    for (i, item) in items.iter().enumerate() {
        let rb = item.quant.expect("checked by row_amax").row_bytes();
        let per_task = (TASK_BYTES / rb).max(1) as usize;
        let mut cur: Option<Task> = None;
        for seg in &item.segments {
            for r in 0..seg.len / rb {
                let off = seg.offset + r * rb;
                let joins = cur.as_ref().is_some_and(|t| {
                    let (o, l) = *t.spans.last().expect("a task has a span");
                    t.shard == seg.shard
                        && t.rows < per_task
                        && off >= o + l
                        && off - (o + l) <= MAX_GAP
                });
                if joins {
                    let t = cur.as_mut().expect("checked above");
                    let last = t.spans.last_mut().expect("a task has a span");
                    if last.0 + last.1 == off {
                        last.1 += rb;
                    } else {
                        t.spans.push((off, rb));
                    }
                    t.rows += 1;
                } else {
                    tasks.extend(cur.take());
                    cur = Some(Task {
                        item: i,
                        shard: seg.shard,
                        spans: vec![(off, rb)],
                        out,
                        rows: 1,
                    });
                }
                out += 1;
            }
        }
        tasks.extend(cur);
    }
    (tasks, out)
}

/// One thread: tasks until none is left (or another thread failed); `(output index,
/// values)` of each.
fn work(
    ckpt: &Checkpoint,
    items: &[ReadItem],
    tasks: &[Task],
    method: ReadMethod,
    next: &AtomicUsize,
    failed: &AtomicBool,
) -> Result<Vec<(usize, Vec<f32>)>> {
    let mut scratch = Vec::new();
    let mut done = Vec::new();
    while !failed.load(Ordering::Relaxed) {
        let Some(t) = tasks.get(next.fetch_add(1, Ordering::Relaxed)) else {
            break;
        };
        let item = &items[t.item];
        let spec = item.quant.expect("checked by row_amax");
        let len = t.rows * spec.row_bytes() as usize;
        let shard = &ckpt.shards[t.shard];
        let mut values = vec![0f32; t.rows];
        let read = match t.spans[..] {
            // One range of a mapping: its amax straight from the page cache, no copy.
            [(offset, _)] if method == ReadMethod::Mmap => {
                shard.with_mapped(offset, len, &item.name, |src| {
                    rows_amax(&spec, src, &mut values)
                })
            }
            ref spans => {
                scratch.resize(len, 0);
                match spans {
                    [(offset, _)] => shard.read_into(*offset, &mut scratch, method, &item.name),
                    _ => shard.read_spans_into(spans, &mut scratch, method, &item.name),
                }
                .map(|()| rows_amax(&spec, &scratch, &mut values))
            }
        };
        if let Err(e) = read {
            failed.store(true, Ordering::Relaxed);
            return Err(e);
        }
        done.push((t.out, values));
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::Dtype;
    use crate::plan::Segment;
    use crate::quant::{QuantSpec, Rounding};
    use std::io::Write;

    /// A one-tensor checkpoint of `rows x cols` bf16 values `f(r, c)`.
    fn bf16_file(
        dir: &std::path::Path,
        rows: usize,
        cols: usize,
        f: impl Fn(usize, usize) -> u16,
    ) -> Checkpoint {
        let data: Vec<u8> = (0..rows * cols)
            .flat_map(|i| f(i / cols, i % cols).to_le_bytes())
            .collect();
        let header = format!(
            "{{\"w\":{{\"dtype\":\"BF16\",\"shape\":[{rows},{cols}],\"data_offsets\":[0,{}]}}}}",
            data.len()
        );
        let mut h = header.into_bytes();
        while h.len() % 8 != 0 {
            h.push(b' ');
        }
        let p = dir.join("m.safetensors");
        let mut file = std::fs::File::create(&p).unwrap();
        file.write_all(&(h.len() as u64).to_le_bytes()).unwrap();
        file.write_all(&h).unwrap();
        file.write_all(&data).unwrap();
        drop(file);
        Checkpoint::open(&p).unwrap()
    }

    /// Columns `[a, b)` of every row, one segment a row (a row-parallel slice).
    fn slice(ck: &Checkpoint, rows: usize, cols: usize, a: usize, b: usize) -> ReadItem {
        let base = ck.shards[0].header.data_start;
        ReadItem {
            name: "w".into(),
            segments: (0..rows)
                .map(|r| Segment {
                    shard: 0,
                    offset: base + 2 * (r * cols + a) as u64,
                    len: 2 * (b - a) as u64,
                })
                .collect(),
            quant: Some(QuantSpec::new(Dtype::BF16, (b - a) as u64, Rounding::Fp32).unwrap()),
            amax: None,
            optional: false,
            background: false,
        }
    }

    #[test]
    fn amax_of_row_slices_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (rows, cols) = (300, 96);
        // row r: values up to (r % 50 + 1) in bf16, a negative one the largest; row 7 zero;
        // row 9 holds a NaN in columns [40, 41)
        let v = |r: usize, c: usize| -> u16 {
            if r == 7 {
                return 0;
            }
            if r == 9 && c == 40 {
                return 0x7FC0;
            }
            let x = ((c * 7 + r) % 31) as f32 / 31.0 * (r % 50 + 1) as f32;
            let x = if c.is_multiple_of(5) { -x } else { x };
            (x.to_bits() >> 16) as u16
        };
        let ck = bf16_file(dir.path(), rows, cols, v);
        for (a, b) in [(0, 96), (0, 48), (48, 96), (17, 18), (30, 90)] {
            let items = [slice(&ck, rows, cols, a, b), slice(&ck, 3, cols, a, b)];
            for threads in [1, 4] {
                for method in [ReadMethod::Mmap, ReadMethod::Pread] {
                    let got = row_amax(&ck, &items, threads, method).unwrap();
                    let want: Vec<f32> = (0..rows)
                        .chain(0..3)
                        .map(|r| {
                            let m = (a..b).map(|c| v(r, c) & 0x7FFF).max().unwrap();
                            if m >= 0x7F80 {
                                f32::INFINITY
                            } else {
                                f32::from_bits((m as u32) << 16)
                            }
                        })
                        .collect();
                    assert_eq!(got, want, "columns [{a}, {b}), {threads} threads");
                }
            }
        }
    }

    #[test]
    fn items_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let ck = bf16_file(dir.path(), 4, 8, |_, _| 0x3F80);
        let mut item = slice(&ck, 4, 8, 0, 4);
        assert_eq!(
            row_amax(&ck, &[], 2, ReadMethod::Mmap).unwrap(),
            Vec::<f32>::new()
        );
        item.quant = None;
        let e = row_amax(&ck, &[item.clone()], 2, ReadMethod::Mmap).unwrap_err();
        assert!(e.to_string().contains("w:"), "{e}");
        let mut item = slice(&ck, 4, 8, 0, 4);
        item.segments[1].offset += 1 << 20; // outside the file
        assert!(row_amax(&ck, &[item], 2, ReadMethod::Mmap).is_err());
    }
}
