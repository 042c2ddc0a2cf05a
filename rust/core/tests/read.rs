//! End-to-end tests of the core: write real shard files, resolve them, read them back.

use std::path::Path;
use std::sync::Arc;

use fastfp8_core::plan::{row_range, whole_tensor};
use fastfp8_core::reader::{DestBuffer, Reader, ReaderConfig};
use fastfp8_core::{Checkpoint, Error, ErrorKind, ReadMethod};

/// Writes a shard of U8 tensors `(name, len)` whose bytes are a function of name and index.
fn write_shard(path: &Path, tensors: &[(&str, usize)]) {
    let mut header = String::from("{");
    let mut off = 0;
    let mut data = Vec::new();
    for (i, (name, len)) in tensors.iter().enumerate() {
        if i > 0 {
            header.push(',');
        }
        header += &format!(
            r#""{name}":{{"dtype":"U8","shape":[{len}],"data_offsets":[{off},{}]}}"#,
            off + len
        );
        off += len;
        data.extend(pattern(name, *len));
    }
    header.push('}');
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend(data);
    std::fs::write(path, bytes).unwrap();
}

fn pattern(name: &str, len: usize) -> Vec<u8> {
    let seed = name
        .bytes()
        .fold(7u32, |a, b| a.wrapping_mul(31).wrapping_add(b as u32));
    (0..len)
        .map(|i| (seed.wrapping_add(i as u32).wrapping_mul(2654435761) >> 13) as u8)
        .collect()
}

/// Reads every item, checking bytes and releasing each chunk, and returns the stats.
fn read_all(
    ckpt: Arc<Checkpoint>,
    names: &[&str],
    budget: usize,
    cfg: ReaderConfig,
) -> fastfp8_core::Stats {
    let items: Vec<_> = names
        .iter()
        .map(|n| whole_tensor(&ckpt, n).unwrap())
        .collect();
    let lens: Vec<usize> = items.iter().map(|i| i.len() as usize).collect();
    let mut buf = vec![0u8; budget];
    // SAFETY: `buf` outlives `reader` (dropped at the end of this function, before buf) and
    // is only read between delivery and release.
    let dest = unsafe { DestBuffer::new(buf.as_mut_ptr(), budget as u64) };
    let reader = Reader::start(ckpt, items, dest, cfg).unwrap();
    let mut got: Vec<Vec<u8>> = lens.iter().map(|&l| vec![0; l]).collect();
    while let Some(d) = reader.next().unwrap() {
        let src = &buf[d.buf_offset as usize..(d.buf_offset + d.len) as usize];
        got[d.item][d.item_offset as usize..(d.item_offset + d.len) as usize].copy_from_slice(src);
        reader.release(d.buf_offset, d.len).unwrap();
    }
    for (i, n) in names.iter().enumerate() {
        assert_eq!(got[i], pattern(n, lens[i]), "tensor {n}");
    }
    reader.stats()
}

#[test]
fn reads_in_chunks_within_budget() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("model.safetensors");
    let tensors = [
        ("a", 1000),
        ("b", 0),
        ("c", 65_537),
        ("d", 3),
        ("e", 20_000),
    ];
    write_shard(&p, &tensors);
    let names: Vec<&str> = tensors.iter().map(|t| t.0).collect();
    // (read-ahead: a window of one byte keeps its thread a step ahead of the threads, one
    // of 1 MiB asks for everything at once; with O_DIRECT there is none)
    for (method, merge_bytes, read_ahead_bytes) in [
        (ReadMethod::Pread, 0, 0),
        (ReadMethod::Mmap, 0, 0),
        (ReadMethod::Pread, 3000, 0),
        (ReadMethod::Mmap, 0, 1),
        (ReadMethod::Pread, 0, 1 << 20),
        (ReadMethod::Direct, 0, 1 << 20),
    ] {
        for (budget, chunk, piece, threads) in [
            (4096, 1000, 333, 3),
            (70_000, 65_537, 4096, 8),
            (1, 1, 1, 2),
        ] {
            let ckpt = Arc::new(Checkpoint::open(dir.path()).unwrap());
            let cfg = ReaderConfig {
                threads,
                chunk_bytes: Some(chunk),
                piece_bytes: piece,
                method,
                merge_bytes,
                bus_bytes_per_s: 0.0,
                read_ahead_bytes,
            };
            let s = read_all(ckpt, &names, budget, cfg);
            assert!(s.peak_in_flight <= budget as u64);
            assert_eq!(
                s.bytes_read,
                tensors.iter().map(|t| t.1 as u64).sum::<u64>()
            );
        }
    }
}

/// Background items (the first and the last, as a model's embeddings and lm_head) go out
/// spread between the other items' chunks, each item's chunks in order and its bytes
/// right, within the budget; with a read-ahead window they keep their place in the plan.
#[test]
fn background_items_go_out_between_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("model.safetensors");
    let tensors = [
        ("embed", 8_000),
        ("a", 10_000),
        ("b", 0),
        ("c", 30_001),
        ("head", 8_000),
    ];
    write_shard(&p, &tensors);
    let names: Vec<&str> = tensors.iter().map(|t| t.0).collect();
    for (method, read_ahead_bytes, merge_bytes) in [
        (ReadMethod::Mmap, 0, 0),
        (ReadMethod::Pread, 0, 0),
        (ReadMethod::Pread, 0, 3000),
        (ReadMethod::Pread, 1 << 20, 0),
    ] {
        for (budget, threads) in [(4096usize, 3), (64 << 10, 8), (1000, 1)] {
            let ckpt = Arc::new(Checkpoint::open(dir.path()).unwrap());
            let items: Vec<_> = names
                .iter()
                .map(|n| {
                    let mut it = whole_tensor(&ckpt, n).unwrap();
                    it.background = *n == "embed" || *n == "head";
                    it
                })
                .collect();
            let mut buf = vec![0u8; budget];
            // SAFETY: `buf` outlives `reader` (dropped at the end of the loop body, first)
            // and is only read between delivery and release.
            let dest = unsafe { DestBuffer::new(buf.as_mut_ptr(), budget as u64) };
            let cfg = ReaderConfig {
                threads,
                chunk_bytes: Some(1000),
                piece_bytes: 400,
                method,
                merge_bytes,
                bus_bytes_per_s: 0.0,
                read_ahead_bytes,
            };
            let reader = Reader::start(Arc::clone(&ckpt), items, dest, cfg).unwrap();
            let mut got: Vec<Vec<u8>> = tensors.iter().map(|t| vec![0; t.1]).collect();
            let mut next_offset = vec![0u64; tensors.len()];
            let mut order = Vec::new();
            while let Some(d) = reader.next().unwrap() {
                assert_eq!(
                    d.item_offset, next_offset[d.item],
                    "{}: in order",
                    names[d.item]
                );
                next_offset[d.item] += d.len;
                let src = &buf[d.buf_offset as usize..(d.buf_offset + d.len) as usize];
                got[d.item][d.item_offset as usize..(d.item_offset + d.len) as usize]
                    .copy_from_slice(src);
                reader.release(d.buf_offset, d.len).unwrap();
                order.push(d.item);
            }
            assert!(reader.stats().peak_in_flight <= budget as u64);
            drop(reader);
            for (i, n) in names.iter().enumerate() {
                assert_eq!(got[i], pattern(n, tensors[i].1), "tensor {n}");
            }
            let first = |item| order.iter().position(|&i| i == item).unwrap();
            let last = |item| order.iter().rposition(|&i| i == item).unwrap();
            if read_ahead_bytes == 0 {
                // 16 background chunks spread over 42 of the others' (b's is empty), in
                // plan order, never two in a row, the last one right after the others'
                let bg = |i: usize| i == 0 || i == 4;
                assert!(first(0) > first(1) && last(0) < first(4), "{order:?}");
                assert!(
                    order.windows(2).all(|w| !(bg(w[0]) && bg(w[1]))),
                    "{order:?}"
                );
                assert_eq!(last(3), order.len() - 2, "{order:?}");
            } else {
                let mut sorted = order.clone();
                sorted.sort();
                assert_eq!(order, sorted, "plan order with a read-ahead window");
            }
        }
    }
}

/// A background item may not be quantized on the way.
#[test]
fn a_background_item_is_read_as_it_is() {
    use fastfp8_core::quant::{QuantSpec, Rounding};
    use fastfp8_core::Dtype;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("model.safetensors");
    write_shard(&p, &[("w", 64)]);
    let ckpt = Arc::new(Checkpoint::open(&p).unwrap());
    let mut item = whole_tensor(&ckpt, "w").unwrap();
    item.background = true;
    item.quant = Some(QuantSpec::new(Dtype::BF16, 4, Rounding::Fp32).unwrap());
    let mut buf = vec![0u8; 4096];
    // SAFETY: `buf` outlives the reader, which is never started.
    let dest = unsafe { DestBuffer::new(buf.as_mut_ptr(), 4096) };
    let err = Reader::start(ckpt, vec![item], dest, ReaderConfig::default()).err();
    assert!(
        matches!(err, Some(Error::Invalid(ref m)) if m.contains("background")),
        "{err:?}"
    );
}

/// A reader closed with most of its items unread stops its read-ahead thread too (it waits
/// a window ahead of the threads, which wait for room): close returns, nothing hangs.
#[test]
fn closing_stops_the_read_ahead() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("model.safetensors");
    let tensors = [("a", 1 << 20), ("b", 1 << 20), ("c", 1 << 20)];
    write_shard(&p, &tensors);
    let ckpt = Arc::new(Checkpoint::open(dir.path()).unwrap());
    let items: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|n| whole_tensor(&ckpt, n).unwrap())
        .collect();
    let mut buf = vec![0u8; 4096];
    // SAFETY: `buf` outlives `reader`, which is closed and dropped before it.
    let dest = unsafe { DestBuffer::new(buf.as_mut_ptr(), 4096) };
    let cfg = ReaderConfig {
        threads: 2,
        chunk_bytes: Some(4096),
        piece_bytes: 1024,
        method: ReadMethod::Mmap,
        merge_bytes: 0,
        bus_bytes_per_s: 0.0,
        read_ahead_bytes: 8192,
    };
    let reader = Reader::start(ckpt, items, dest, cfg).unwrap();
    let d = reader.next().unwrap().unwrap();
    let at = d.buf_offset as usize;
    assert_eq!(&buf[at..at + 16], &pattern("a", 16)[..]);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let t = std::time::Instant::now();
    reader.close();
    assert!(t.elapsed() < std::time::Duration::from_secs(2));
    assert_eq!(reader.live_threads(), 0);
    drop((reader, d));
}

/// A consumer slower than the threads gets the chunks that are ready as one delivery:
/// consecutive chunks of one item, back to back in the buffer, up to `merge_bytes`; never
/// across items. A merged delivery is released whole, at its own length only.
#[test]
fn ready_chunks_are_merged_for_a_slow_consumer() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("model.safetensors");
    let tensors = [("a", 100_000), ("b", 50_000), ("c", 5)];
    write_shard(&p, &tensors);
    let ckpt = Arc::new(Checkpoint::open(dir.path()).unwrap());
    let items: Vec<_> = tensors
        .iter()
        .map(|t| whole_tensor(&ckpt, t.0).unwrap())
        .collect();
    let budget = 64 << 10;
    let mut buf = vec![0u8; budget];
    // SAFETY: `buf` outlives `reader` (dropped before buf) and is only read between
    // delivery and release.
    let dest = unsafe { DestBuffer::new(buf.as_mut_ptr(), budget as u64) };
    let cfg = ReaderConfig {
        threads: 2,
        chunk_bytes: Some(4096),
        piece_bytes: 4096,
        method: ReadMethod::Pread,
        merge_bytes: 16384,
        bus_bytes_per_s: 0.0,
        read_ahead_bytes: 0,
    };
    let reader = Reader::start(ckpt, items, dest, cfg).unwrap();
    let mut got: Vec<Vec<u8>> = tensors.iter().map(|_| Vec::new()).collect();
    let (mut merged, mut checked_release) = (0, false);
    loop {
        // slow: the threads fill the ring before each next()
        std::thread::sleep(std::time::Duration::from_millis(20));
        let Some(d) = reader.next().unwrap() else {
            break;
        };
        assert!(d.len <= 16384, "{d:?}");
        assert_eq!(d.src_len, d.len);
        assert_eq!(d.item_offset as usize, got[d.item].len());
        let src = &buf[d.buf_offset as usize..(d.buf_offset + d.len) as usize];
        got[d.item].extend_from_slice(src);
        if d.len > 4096 {
            merged += 1;
            if !checked_release {
                for wrong in [4096, d.len - 1, d.len + 1] {
                    let e = reader.release(d.buf_offset, wrong).unwrap_err();
                    assert_eq!(e.kind(), ErrorKind::Release, "{e}");
                }
                checked_release = true;
            }
        }
        reader.release(d.buf_offset, d.len).unwrap();
    }
    assert!(merged > 0, "no delivery was merged");
    for (i, (n, len)) in tensors.iter().enumerate() {
        assert_eq!(got[i], pattern(n, *len), "tensor {n}");
    }
    // every chunk's course: allocated, read, delivered (merged ones with their first),
    // released, in that order, each chunk once
    let times = reader.chunk_times();
    assert_eq!(times.iter().map(|t| t.src_len).sum::<u64>(), 150_005);
    assert_eq!(times.len(), 25 + 13 + 1);
    for t in &times {
        assert!(
            t.alloc_ns <= t.read_ns && t.read_ns <= t.deliver_ns && t.deliver_ns <= t.release_ns,
            "{t:?}"
        );
        assert!(
            t.release_ns >= 20_000_000,
            "{t:?}: released after a 20 ms wait"
        );
    }
}

#[test]
fn whole_items_must_fit_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.safetensors");
    write_shard(&p, &[("small", 10), ("big", 100)]);
    let ckpt = Arc::new(Checkpoint::open(&p).unwrap());
    let s = read_all(
        Arc::clone(&ckpt),
        &["small", "big"],
        100,
        ReaderConfig {
            chunk_bytes: None,
            ..Default::default()
        },
    );
    assert!(s.peak_in_flight <= 100);
    let mut buf = vec![0u8; 50];
    // SAFETY: buf outlives the (failed) reader.
    let dest = unsafe { DestBuffer::new(buf.as_mut_ptr(), 50) };
    let items = vec![whole_tensor(&ckpt, "big").unwrap()];
    let err = Reader::start(
        ckpt,
        items,
        dest,
        ReaderConfig {
            chunk_bytes: None,
            ..Default::default()
        },
    )
    .err()
    .unwrap();
    assert!(matches!(err, Error::TensorOverBudget { .. }), "{err}");
    assert!(err.to_string().contains("\"big\"") && err.to_string().contains("x.safetensors"));
}

#[test]
fn holding_every_slot_is_an_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.safetensors");
    write_shard(&p, &[("a", 60), ("b", 60)]);
    let ckpt = Arc::new(Checkpoint::open(&p).unwrap());
    let items = vec![
        whole_tensor(&ckpt, "a").unwrap(),
        whole_tensor(&ckpt, "b").unwrap(),
    ];
    let mut buf = vec![0u8; 100];
    // SAFETY: buf outlives reader.
    let dest = unsafe { DestBuffer::new(buf.as_mut_ptr(), 100) };
    let reader = Reader::start(
        ckpt,
        items,
        dest,
        ReaderConfig {
            chunk_bytes: None,
            ..Default::default()
        },
    )
    .unwrap();
    let first = reader.next().unwrap().unwrap();
    let err = reader.next().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Budget, "{err}");
    assert_eq!(first.item, 0);
}

#[test]
fn row_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.safetensors");
    write_shard(&p, &[("t", 100)]);
    let ckpt = Checkpoint::open(&p).unwrap();
    let item = row_range(&ckpt, "t", 10, 30).unwrap();
    assert_eq!(item.segments[0].len, 20);
    assert!(row_range(&ckpt, "t", 30, 101).is_err());
    assert!(row_range(&ckpt, "nope", 0, 1).is_err());
}

#[test]
fn truncated_after_open_is_a_read_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.safetensors");
    write_shard(&p, &[("a", 5000), ("b", 5000)]);
    for method in [ReadMethod::Pread, ReadMethod::Mmap] {
        let ckpt = Arc::new(Checkpoint::open(&p).unwrap());
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(3000).unwrap();
        let items = vec![
            whole_tensor(&ckpt, "a").unwrap(),
            whole_tensor(&ckpt, "b").unwrap(),
        ];
        let mut buf = vec![0u8; 20_000];
        // SAFETY: buf outlives reader.
        let dest = unsafe { DestBuffer::new(buf.as_mut_ptr(), 20_000) };
        let cfg = ReaderConfig {
            threads: 2,
            chunk_bytes: Some(1000),
            piece_bytes: 500,
            method,
            merge_bytes: 0,
            bus_bytes_per_s: 0.0,
            read_ahead_bytes: 0,
        };
        let reader = Reader::start(ckpt, items, dest, cfg).unwrap();
        let err = loop {
            match reader.next() {
                Ok(Some(d)) => reader.release(d.buf_offset, d.len).unwrap(),
                Ok(None) => panic!("read a truncated file to the end"),
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), ErrorKind::Read, "{err}");
        write_shard(&p, &[("a", 5000), ("b", 5000)]);
    }
}

#[test]
fn index_resolution_and_its_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_shard(&d.join("s1.safetensors"), &[("a", 4), ("b", 4)]);
    write_shard(&d.join("s2.safetensors"), &[("c", 4)]);
    let index = d.join("model.safetensors.index.json");
    let write_index = |m: &str| {
        std::fs::write(
            &index,
            format!(r#"{{"metadata":{{}},"weight_map":{{{m}}}}}"#),
        )
        .unwrap()
    };

    write_index(r#""a":"s1.safetensors","b":"s1.safetensors","c":"s2.safetensors""#);
    let c = Checkpoint::open(d).unwrap();
    assert_eq!(c.shards.len(), 2);
    assert_eq!(c.tensors.len(), 3);

    let kind = |m: &str| {
        write_index(m);
        format!("{:?}", Checkpoint::open(d).unwrap_err())
            .split([' ', '{'])
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(kind(r#""a":"s3.safetensors""#), "MissingShard");
    assert_eq!(
        kind(r#""a":"s2.safetensors","c":"s2.safetensors""#),
        "TensorNotInShard"
    );
    assert_eq!(kind(r#""a":"../s1.safetensors""#), "UnsafeShardPath");
    assert_eq!(kind(r#""a":"/etc/passwd""#), "UnsafeShardPath");
    assert_eq!(kind(r#""zz":"s1.safetensors""#), "TensorNotInShard");
    write_shard(&d.join("s2.safetensors"), &[("a", 4)]);
    assert_eq!(
        kind(r#""a":"s1.safetensors","b":"s1.safetensors","c":"s2.safetensors""#),
        "TensorInTwoShards"
    );
    std::fs::write(&index, "{not json").unwrap();
    assert_eq!(
        format!("{:?}", Checkpoint::open(d).unwrap_err())
            .split([' ', '{'])
            .next()
            .unwrap(),
        "IndexInvalid"
    );
    std::fs::remove_file(&index).unwrap();
    assert!(matches!(
        Checkpoint::open(d).unwrap_err(),
        Error::NoCheckpoint { .. }
    ));
    assert!(matches!(
        Checkpoint::open(&d.join("nope")).unwrap_err(),
        Error::NotFound { .. }
    ));
}

/// A row-parallel slice: one small range per row, gaps between them. The reader groups
/// such ranges into pieces; the bytes must be the strided slice, with either method, for
/// chunk and piece sizes that cut through the groups.
/// Bytes `[a, b)` of each of `rows` rows of `width` bytes from `base`: one segment a row (a
/// tensor-parallel row slice), and the bytes they hold, from `all` (the rows' bytes).
fn column_slice(
    base: u64,
    all: &[u8],
    rows: usize,
    width: usize,
    (a, b): (usize, usize),
) -> (Vec<fastfp8_core::plan::Segment>, Vec<u8>) {
    let segments = (0..rows)
        .map(|r| fastfp8_core::plan::Segment {
            shard: 0,
            offset: base + (r * width + a) as u64,
            len: (b - a) as u64,
        })
        .collect();
    let bytes = (0..rows)
        .flat_map(|r| all[r * width + a..r * width + b].to_vec())
        .collect();
    (segments, bytes)
}

#[test]
fn strided_ranges_read_as_the_slice() {
    use fastfp8_core::plan::ReadItem;

    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("model.safetensors");
    let (rows, width) = (300usize, 1000usize);
    write_shard(&p, &[("w", rows * width), ("z", 5)]);
    let ckpt = Arc::new(Checkpoint::open(&p).unwrap());
    let base = whole_tensor(&ckpt, "w").unwrap().segments[0].offset;
    let all = pattern("w", rows * width);
    for (cols, piece, chunk) in [
        ((100, 350), 4096, 10_000),
        ((0, 1), 64, 7),
        ((999, 1000), 1 << 20, 1 << 20),
    ] {
        let (segments, want) = column_slice(base, &all, rows, width, cols);
        for method in [ReadMethod::Mmap, ReadMethod::Pread] {
            let item = ReadItem {
                name: "w".into(),
                segments: segments.clone(),
                quant: None,
                amax: None,
                optional: false,
                background: false,
            };
            let budget = 64 << 10;
            let mut buf = vec![0u8; budget];
            // SAFETY: `buf` outlives `reader` (dropped at the end of the loop body, first) and
            // is only read between delivery and release.
            let dest = unsafe { DestBuffer::new(buf.as_mut_ptr(), budget as u64) };
            let cfg = ReaderConfig {
                threads: 3,
                chunk_bytes: Some(chunk.min(budget as u64 / 4)),
                piece_bytes: piece,
                method,
                merge_bytes: 0,
                bus_bytes_per_s: 0.0,
                read_ahead_bytes: 0,
            };
            let reader = Reader::start(Arc::clone(&ckpt), vec![item], dest, cfg).unwrap();
            let mut got = vec![0u8; want.len()];
            while let Some(d) = reader.next().unwrap() {
                let src = &buf[d.buf_offset as usize..(d.buf_offset + d.len) as usize];
                got[d.item_offset as usize..(d.item_offset + d.len) as usize].copy_from_slice(src);
                reader.release(d.buf_offset, d.len).unwrap();
            }
            drop(reader);
            assert_eq!(
                got, want,
                "cols {cols:?}, piece {piece}, chunk {chunk}, {method:?}"
            );
        }
    }
}

/// Rows of a column slice (one segment a row, as a tensor-parallel row slice) quantized on
/// the way: several rows join one piece (one read of their span), and the bytes equal the
/// quantization of the slice's rows, with either method.
#[test]
fn strided_rows_quantized_on_the_way_join_pieces() {
    use fastfp8_core::plan::ReadItem;
    use fastfp8_core::quant::{quantize_rows, scales_finite, QuantSpec, Rounding};
    use fastfp8_core::Dtype;

    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("model.safetensors");
    let (rows, width, a, b) = (300usize, 1000usize, 100usize, 350usize); // bytes; 125 bf16 columns
    write_shard(&p, &[("w", rows * width), ("z", 5)]);
    let ckpt = Arc::new(Checkpoint::open(&p).unwrap());
    let base = whole_tensor(&ckpt, "w").unwrap().segments[0].offset;
    let all = pattern("w", rows * width);
    let (segments, slice) = column_slice(base, &all, rows, width, (a, b));
    let cols = (b - a) / 2;
    let spec = QuantSpec::new(Dtype::BF16, cols as u64, Rounding::Fp32).unwrap();
    let mut want = (vec![0u8; rows * cols], vec![0u8; rows * 2]);
    quantize_rows(&spec, &slice, &mut want.0, &mut want.1);
    for method in [ReadMethod::Mmap, ReadMethod::Pread] {
        let item = ReadItem {
            name: "w".into(),
            segments: segments.clone(),
            quant: Some(spec),
            amax: None,
            optional: false,
            background: false,
        };
        let budget = 256 << 10;
        let mut buf = vec![0u8; budget];
        // SAFETY: `buf` outlives `reader` (dropped below, first) and is only read between
        // delivery and release.
        let dest = unsafe { DestBuffer::new(buf.as_mut_ptr(), budget as u64) };
        let piece = 8 * (b - a) as u64; // 8 rows a piece
        let cfg = ReaderConfig {
            threads: 3,
            chunk_bytes: Some(budget as u64 / 2), // the whole slice: one chunk
            piece_bytes: piece,
            method,
            merge_bytes: 0,
            bus_bytes_per_s: 0.0,
            read_ahead_bytes: 0,
        };
        let reader = Reader::start(Arc::clone(&ckpt), vec![item], dest, cfg).unwrap();
        let d = reader.next().unwrap().expect("one chunk");
        let got = buf[d.buf_offset as usize..(d.buf_offset + d.len) as usize].to_vec();
        reader.release(d.buf_offset, d.len).unwrap();
        assert!(reader.next().unwrap().is_none());
        let pieces = reader.stats().pieces;
        let non_finite = reader.non_finite();
        drop(reader);
        // the pattern's bytes hold NaN and Inf bf16 values: the reader names the item
        assert!(!scales_finite(Dtype::BF16, &want.1));
        assert_eq!(non_finite, vec![0], "{method:?}");
        assert_eq!(&got[..rows * cols], &want.0[..], "{method:?}");
        assert_eq!(&got[rows * cols..], &want.1[..], "{method:?}");
        assert_eq!(
            pieces,
            rows.div_ceil(8) as u64,
            "{method:?}: 8 rows a piece"
        );
    }
}

/// Three bf16 weights `[64, 64]` (8 KiB each) of finite values, and their source bytes.
fn three_weights(dir: &Path) -> (Arc<Checkpoint>, Vec<Vec<u8>>) {
    let p = dir.join("w.safetensors");
    let (rows, cols) = (64usize, 64usize);
    let n = rows * cols * 2;
    let header = format!(
        r#"{{"a":{{"dtype":"BF16","shape":[{rows},{cols}],"data_offsets":[0,{n}]}},"b":{{"dtype":"BF16","shape":[{rows},{cols}],"data_offsets":[{n},{}]}},"c":{{"dtype":"BF16","shape":[{rows},{cols}],"data_offsets":[{},{}]}}}}"#,
        2 * n,
        2 * n,
        3 * n
    );
    let weights: Vec<Vec<u8>> = (0..3)
        .map(|w| {
            (0..rows * cols)
                .flat_map(|i| {
                    let v = ((i * 7 + w * 13) as f32 * 0.37).sin() * (1 + i / cols) as f32;
                    ((v.to_bits() >> 16) as u16).to_le_bytes()
                })
                .collect()
        })
        .collect();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    for w in &weights {
        bytes.extend_from_slice(w);
    }
    std::fs::write(&p, &bytes).unwrap();
    (Arc::new(Checkpoint::open(&p).unwrap()), weights)
}

/// An optional item (quantized on the way, or not, as the reader decides on reaching it):
/// read plain when the threads have had no idle time (the first item), quantized when they
/// have waited for room (a consumer holding its chunks); undecided until the reader reaches
/// it; the bytes right either way, and the decision never changes.
#[test]
fn optional_items_are_decided_as_the_reader_reaches_them() {
    use fastfp8_core::quant::{quantize_rows, QuantSpec, Rounding};
    use fastfp8_core::Dtype;
    let dir = tempfile::tempdir().unwrap();
    let (ckpt, weights) = three_weights(dir.path());
    let spec = QuantSpec::new(Dtype::BF16, 64, Rounding::Fp32).unwrap();
    let mut quantized_c = (vec![0u8; 64 * 64], vec![0u8; 64 * 2]);
    quantize_rows(&spec, &weights[2], &mut quantized_c.0, &mut quantized_c.1);
    let item = |name: &str, optional: bool| {
        let mut it = whole_tensor(&ckpt, name).unwrap();
        if optional {
            it.quant = Some(spec);
            it.optional = true;
        }
        it
    };
    for method in [ReadMethod::Pread, ReadMethod::Mmap] {
        let cfg = ReaderConfig {
            threads: 2,
            chunk_bytes: Some(8 << 10),
            piece_bytes: 4 << 10,
            method,
            merge_bytes: 0,
            bus_bytes_per_s: 0.0,
            read_ahead_bytes: 0,
        };
        // first: nothing read yet, nothing waiting: plain
        let mut buf = vec![0u8; 16 << 10];
        // SAFETY: `buf` outlives the reader (dropped first, at the end of the block) and is
        // only read between delivery and release.
        let dest = unsafe { DestBuffer::new(buf.as_mut_ptr(), buf.len() as u64) };
        {
            let reader =
                Reader::start(Arc::clone(&ckpt), vec![item("c", true)], dest, cfg.clone()).unwrap();
            let d = reader.next().unwrap().unwrap();
            assert_eq!(reader.quantized(0), Some(false));
            assert_eq!((d.len, d.src_len), (8 << 10, 8 << 10));
            assert_eq!(
                &buf[d.buf_offset as usize..][..d.len as usize],
                &weights[2][..]
            );
            reader.release(d.buf_offset, d.len).unwrap();
            assert!(reader.next().unwrap().is_none());
        }
        // last, behind two chunks the consumer holds for 10 ms: the ring (two chunks) is
        // full until the first is released, the threads idle meanwhile: quantized
        let dest = unsafe { DestBuffer::new(buf.as_mut_ptr(), buf.len() as u64) };
        let items = vec![item("a", false), item("b", false), item("c", true)];
        let reader = Reader::start(Arc::clone(&ckpt), items, dest, cfg).unwrap();
        let a = reader.next().unwrap().unwrap();
        let b = reader.next().unwrap().unwrap();
        assert_eq!((a.item, b.item), (0, 1));
        assert_eq!(reader.quantized(2), None, "not reached yet");
        assert_eq!(reader.quantized(0), Some(false));
        assert_eq!(
            &buf[b.buf_offset as usize..][..b.len as usize],
            &weights[1][..]
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
        assert!(
            reader.stats().room_wait_ns >= 10_000_000,
            "two threads waited"
        );
        reader.release(a.buf_offset, a.len).unwrap();
        let c = reader.next().unwrap().unwrap();
        assert_eq!(reader.quantized(2), Some(true), "{method:?}");
        assert_eq!((c.item, c.len, c.src_len), (2, 64 * 66, 8 << 10));
        let got = &buf[c.buf_offset as usize..][..c.len as usize];
        assert_eq!(&got[..64 * 64], &quantized_c.0[..]);
        assert_eq!(&got[64 * 64..], &quantized_c.1[..]);
        reader.release(b.buf_offset, b.len).unwrap();
        reader.release(c.buf_offset, c.len).unwrap();
        assert!(reader.next().unwrap().is_none());
        assert_eq!(reader.quantized(2), Some(true));
        assert!(reader.non_finite().is_empty(), "finite weights");
        drop(reader);
    }
}

/// With the bus's rate given, an optional item goes to the side that ends the plan sooner:
/// over a bus that is all but stopped (the bus sets the pace), quantized, FP8 halving its
/// bytes; over a bus that is all but free (the threads set the pace), read plain, the
/// quantization only adding to the threads' work. The bytes right either way.
#[test]
fn optional_items_follow_the_balance_of_threads_and_bus() {
    use fastfp8_core::quant::{QuantSpec, Rounding};
    use fastfp8_core::Dtype;
    let dir = tempfile::tempdir().unwrap();
    let (ckpt, weights) = three_weights(dir.path());
    let spec = QuantSpec::new(Dtype::BF16, 64, Rounding::Fp32).unwrap();
    for (bus, want) in [(1.0, true), (1e18, false)] {
        let items: Vec<_> = ["a", "b", "c"]
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let mut it = whole_tensor(&ckpt, name).unwrap();
                if i > 0 {
                    it.quant = Some(spec);
                    it.optional = true;
                }
                it
            })
            .collect();
        let cfg = ReaderConfig {
            threads: 2,
            chunk_bytes: Some(8 << 10),
            piece_bytes: 4 << 10,
            method: ReadMethod::Pread,
            merge_bytes: 0,
            bus_bytes_per_s: bus,
            read_ahead_bytes: 0,
        };
        let mut buf = vec![0u8; 32 << 10];
        // SAFETY: `buf` outlives the reader (dropped at the end of the iteration, after
        // it) and is only read between delivery and release.
        let dest = unsafe { DestBuffer::new(buf.as_mut_ptr(), buf.len() as u64) };
        let reader = Reader::start(Arc::clone(&ckpt), items, dest, cfg).unwrap();
        while let Some(d) = reader.next().unwrap() {
            let got = &buf[d.buf_offset as usize..][..d.len as usize];
            if d.item == 0 || !want {
                assert_eq!(got, &weights[d.item][..], "item {}", d.item);
            } else {
                assert_eq!(d.len, 64 * 66, "item {}: e4m3 bytes and scales", d.item);
            }
            reader.release(d.buf_offset, d.len).unwrap();
        }
        assert_eq!(reader.quantized(0), Some(false));
        for i in 1..3 {
            assert_eq!(reader.quantized(i), Some(want), "bus {bus} B/s, item {i}");
        }
        drop(reader);
    }
}

/// An optional item must be one quantized on the way (with no given row amax), and must
/// fit the budget read either way.
#[test]
fn optional_items_are_checked() {
    use fastfp8_core::quant::{QuantSpec, Rounding};
    use fastfp8_core::Dtype;
    let dir = tempfile::tempdir().unwrap();
    let (ckpt, _) = three_weights(dir.path());
    let mut buf = vec![0u8; 4 << 10];
    let cfg = ReaderConfig {
        threads: 1,
        chunk_bytes: None,
        ..ReaderConfig::default()
    };
    let mut plain = whole_tensor(&ckpt, "a").unwrap();
    plain.optional = true;
    let mut too_big = whole_tensor(&ckpt, "a").unwrap();
    too_big.quant = Some(QuantSpec::new(Dtype::BF16, 64, Rounding::Fp32).unwrap());
    too_big.optional = true;
    for (item, kind) in [(plain, ErrorKind::Invalid), (too_big, ErrorKind::Budget)] {
        // SAFETY: `buf` outlives the reader, which fails to start.
        let dest = unsafe { DestBuffer::new(buf.as_mut_ptr(), buf.len() as u64) };
        let err = Reader::start(Arc::clone(&ckpt), vec![item], dest, cfg.clone())
            .err()
            .unwrap();
        assert_eq!(err.kind(), kind, "{err}");
    }
}

/// Reader throughput from a warm page cache, per method and thread count: copies, and
/// host quantization (`pread` reads into a scratch buffer and quantizes from there, `mmap`
/// quantizes in place in the mapping). 256 MiB of weight-like bf16, pieces of `PIECE` bytes
/// (default 4 MiB, the reader's):
/// `cargo test --release -p fastfp8-core --test read -- --ignored --nocapture --test-threads=1`.
#[test]
#[ignore]
fn read_throughput() {
    use fastfp8_core::quant::{QuantSpec, Rounding};
    use fastfp8_core::Dtype;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.safetensors");
    let (rows, cols) = (32768usize, 4096usize);
    let header = format!(
        r#"{{"w":{{"dtype":"BF16","shape":[{rows},{cols}],"data_offsets":[0,{}]}}}}"#,
        rows * cols * 2
    );
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    // weight-like bf16 values: small, both signs, every mantissa
    let mut x = 0x9E37_79B9u32;
    bytes.extend((0..rows * cols).flat_map(|_| {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let v = (0x3C00 | (x & 0x83FF)) as u16; // |v| in [2^-7, 2^-6), random sign
        v.to_le_bytes()
    }));
    std::fs::write(&p, &bytes).unwrap();
    let ckpt = Arc::new(Checkpoint::open(&p).unwrap());
    let mut buf = vec![1u8; 64 << 20]; // written: no first-touch faults in the first run
    let piece_bytes = std::env::var("PIECE").map_or(4 << 20, |v| v.parse().unwrap());
    for quant in [false, true] {
        for threads in [1, 2] {
            for method in [ReadMethod::Pread, ReadMethod::Mmap].repeat(2) {
                let mut item = whole_tensor(&ckpt, "w").unwrap();
                if quant {
                    item.quant =
                        Some(QuantSpec::new(Dtype::BF16, cols as u64, Rounding::Fp32).unwrap());
                }
                // SAFETY: buf outlives the reader (dropped at the end of this iteration).
                let dest = unsafe { DestBuffer::new(buf.as_mut_ptr(), buf.len() as u64) };
                let cfg = ReaderConfig {
                    threads,
                    chunk_bytes: Some(8 << 20),
                    piece_bytes,
                    method,
                    merge_bytes: 0,
                    bus_bytes_per_s: 0.0,
                    read_ahead_bytes: 0,
                };
                let t0 = std::time::Instant::now();
                let reader = Reader::start(Arc::clone(&ckpt), vec![item], dest, cfg).unwrap();
                while let Some(d) = reader.next().unwrap() {
                    reader.release(d.buf_offset, d.len).unwrap();
                }
                let s = t0.elapsed().as_secs_f64();
                drop(reader);
                println!(
                    "{} {method:?}, {threads} thread(s): {:.2} GB/s of bf16",
                    if quant { "quantize" } else { "copy" },
                    (rows * cols * 2) as f64 / s / 1e9
                );
            }
        }
    }
}
