//! Issue 11: no silent zeros, no unsound release, bounded work for tiny headers, the SIGBUS
//! guard survives another handler, index shard names that escape the model directory.

use std::os::unix::fs::symlink;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fastfp8_core::plan::whole_tensor;
use fastfp8_core::reader::{DestBuffer, Reader, ReaderConfig};
use fastfp8_core::{Checkpoint, Error, ErrorKind, ReadMethod};

fn shard_bytes(tensors: &[(&str, usize, u8)]) -> Vec<u8> {
    let mut header = String::from("{");
    let mut off = 0;
    let mut data = Vec::new();
    for (i, (name, len, fill)) in tensors.iter().enumerate() {
        if i > 0 {
            header.push(',');
        }
        header += &format!(
            r#""{name}":{{"dtype":"U8","shape":[{len}],"data_offsets":[{off},{}]}}"#,
            off + len
        );
        off += len;
        data.extend(std::iter::repeat_n(*fill, *len));
    }
    header.push('}');
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend(data);
    bytes
}

fn raw_file(path: &Path, header: &str, data_len: usize) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend(std::iter::repeat_n(0u8, data_len));
    std::fs::write(path, bytes).unwrap();
}

/// A thread that cuts 87 bytes off the file `delay` after it starts (never, for None); it
/// starts before this returns, so what the caller does next races with the cut.
fn cut_later(path: &Path, size: u64, delay: Option<Duration>) -> std::thread::JoinHandle<()> {
    let path = path.to_path_buf();
    let go = Arc::new(std::sync::Barrier::new(2));
    let go2 = Arc::clone(&go);
    let cut = std::thread::spawn(move || {
        go2.wait();
        if let Some(delay) = delay {
            std::thread::sleep(delay);
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            f.set_len(size - 87).unwrap();
        }
    });
    go.wait();
    cut
}

/// Item 1: a truncation by a few bytes lands inside the last page of the copy, which then
/// reads as zeros without a SIGBUS. Every outcome must be the right bytes or an error.
#[test]
fn truncation_during_mapped_copies_is_never_silent_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.safetensors");
    let len = 24 << 20;
    let mut silent = 0;
    let mut errors = 0;
    let mut copy_time = Duration::ZERO;
    for attempt in 0..10u32 {
        std::fs::write(&p, shard_bytes(&[("w", len, 0x5a)])).unwrap();
        let ckpt = Arc::new(Checkpoint::open(&p).unwrap());
        let size = ckpt.shards[0].size;
        let items = vec![whole_tensor(&ckpt, "w").unwrap()];
        let mut buf = vec![0u8; len];
        // SAFETY: buf outlives the reader (dropped below, before buf).
        let dest = unsafe { DestBuffer::new(buf.as_mut_ptr(), len as u64) };
        let cfg = ReaderConfig {
            threads: 1,
            chunk_bytes: None,
            piece_bytes: len as u64,
            method: ReadMethod::Mmap,
            merge_bytes: 0,
            bus_bytes_per_s: 0.0,
            read_ahead_bytes: 0,
        };
        // The first attempt measures how long a copy takes; the others cut the file at
        // points spread over that time.
        let cut = cut_later(&p, size, (attempt > 0).then(|| copy_time * attempt / 9));
        let t0 = std::time::Instant::now();
        let reader = Reader::start(ckpt, items, dest, cfg).unwrap();
        let res = reader.next();
        if attempt == 0 {
            copy_time = t0.elapsed();
        }
        cut.join().unwrap();
        match res {
            Ok(Some(d)) => {
                if buf[..d.len as usize].iter().any(|&b| b != 0x5a) {
                    silent += 1;
                }
                reader.release(d.buf_offset, d.len).unwrap();
            }
            Ok(None) => panic!("no delivery"),
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Read, "{e}");
                errors += 1;
            }
        }
        drop(reader);
    }
    assert_eq!(
        silent, 0,
        "{silent} loads returned zeros silently ({errors} errors)"
    );
}

/// The same for rows quantized straight from the mapping (host quantization with
/// `ReadMethod::Mmap` reads no copy): a cut while the rows are quantized is an error, never
/// e4m3 bytes computed from zeros.
#[test]
fn truncation_while_quantizing_from_the_mapping_is_never_silent_zeros() {
    use fastfp8_core::quant::{QuantSpec, Rounding};
    use fastfp8_core::Dtype;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("q.safetensors");
    let (rows, cols) = (3072usize, 4096usize); // 24 MiB of bf16 1.0
    let header = format!(
        r#"{{"w":{{"dtype":"BF16","shape":[{rows},{cols}],"data_offsets":[0,{}]}}}}"#,
        rows * cols * 2
    );
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend(std::iter::repeat_n([0x80u8, 0x3F], rows * cols).flatten());
    let mut silent = 0;
    let mut errors = 0;
    let mut quant_time = Duration::ZERO;
    for attempt in 0..10u32 {
        std::fs::write(&p, &bytes).unwrap();
        let ckpt = Arc::new(Checkpoint::open(&p).unwrap());
        let size = ckpt.shards[0].size;
        let mut item = whole_tensor(&ckpt, "w").unwrap();
        item.quant = Some(QuantSpec::new(Dtype::BF16, cols as u64, Rounding::Fp32).unwrap());
        let mut buf = vec![0u8; rows * cols * 2];
        // SAFETY: buf outlives the reader (dropped below, before buf).
        let dest = unsafe { DestBuffer::new(buf.as_mut_ptr(), buf.len() as u64) };
        let cfg = ReaderConfig {
            threads: 1,
            chunk_bytes: None,
            piece_bytes: (rows * cols * 2) as u64,
            method: ReadMethod::Mmap,
            merge_bytes: 0,
            bus_bytes_per_s: 0.0,
            read_ahead_bytes: 0,
        };
        let cut = cut_later(&p, size, (attempt > 0).then(|| quant_time * attempt / 9));
        let t0 = std::time::Instant::now();
        let reader = Reader::start(ckpt, vec![item], dest, cfg).unwrap();
        let mut res = Ok(());
        // every chunk, each holding e4m3 bytes then scales: 1.0 is 448 / 448, e4m3 0x7E
        loop {
            match reader.next() {
                Ok(Some(d)) => {
                    let q_len = (d.src_len / 2) as usize;
                    let at = d.buf_offset as usize;
                    if buf[at..at + q_len].iter().any(|&b| b != 0x7E) {
                        silent += 1;
                    }
                    reader.release(d.buf_offset, d.len).unwrap();
                }
                Ok(None) => break,
                Err(e) => {
                    res = Err(e);
                    break;
                }
            }
        }
        if attempt == 0 {
            quant_time = t0.elapsed();
            res.as_ref().expect("the uncut file quantizes");
        }
        cut.join().unwrap();
        if let Err(e) = res {
            assert_eq!(e.kind(), ErrorKind::Read, "{e}");
            assert!(e.to_string().contains("q.safetensors"), "{e}");
            errors += 1;
        }
        drop(reader);
    }
    assert_eq!(
        silent, 0,
        "{silent} chunks held e4m3 bytes of zeros ({errors} errors)"
    );
}

fn small_reader(
    dir: &Path,
    budget: usize,
    buf: &mut Vec<u8>,
) -> (Reader, Vec<fastfp8_core::ReadItem>) {
    let p = dir.join("r.safetensors");
    std::fs::write(
        &p,
        shard_bytes(&[("a", 100, 1), ("b", 100, 2), ("c", 100, 3), ("d", 100, 4)]),
    )
    .unwrap();
    let ckpt = Arc::new(Checkpoint::open(&p).unwrap());
    let items: Vec<_> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| whole_tensor(&ckpt, n).unwrap())
        .collect();
    buf.resize(budget, 0);
    // SAFETY: the caller keeps buf alive longer than the reader.
    let dest = unsafe { DestBuffer::new(buf.as_mut_ptr(), budget as u64) };
    let cfg = ReaderConfig {
        threads: 1,
        chunk_bytes: None,
        piece_bytes: 64,
        method: ReadMethod::Pread,
        merge_bytes: 0,
        bus_bytes_per_s: 0.0,
        read_ahead_bytes: 0,
    };
    (
        Reader::start(ckpt, items.clone(), dest, cfg).unwrap(),
        items,
    )
}

/// Item 2: release frees only a delivered, unreleased chunk of that exact offset and length.
#[test]
fn release_refuses_anything_but_a_delivered_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let mut buf = Vec::new();
    let (reader, _) = small_reader(dir.path(), 400, &mut buf);
    let d = reader.next().unwrap().unwrap();
    assert_eq!((d.item, d.buf_offset, d.len), (0, 0, 100));
    // Give the threads time to allocate (and fill) the chunks after it.
    std::thread::sleep(Duration::from_millis(50));
    // Chunk 1 is allocated at offset 100 but not delivered: not ours to free.
    let e = reader.release(100, 100).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Release, "{e}");
    // Wrong length of a delivered chunk.
    let e = reader.release(0, 50).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Release, "{e}");
    // An offset where nothing starts.
    let e = reader.release(7, 100).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Release, "{e}");
    reader.release(0, 100).unwrap();
    // Twice.
    let e = reader.release(0, 100).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Release, "{e}");
    // The rest still reads correctly, each chunk its own bytes.
    let mut seen = vec![];
    while let Some(d) = reader.next().unwrap() {
        let got = &buf[d.buf_offset as usize..(d.buf_offset + d.len) as usize];
        assert!(
            got.iter().all(|&b| b == d.item as u8 + 1),
            "item {}",
            d.item
        );
        seen.push(d.item);
        reader.release(d.buf_offset, d.len).unwrap();
    }
    assert_eq!(seen, [1, 2, 3]);
}

/// Item 8 (core side): close joins the threads even while another thread waits in next().
#[test]
fn close_joins_the_threads_while_another_thread_waits() {
    let dir = tempfile::tempdir().unwrap();
    let mut buf = Vec::new();
    let (reader, _) = small_reader(dir.path(), 400, &mut buf);
    let reader = Arc::new(reader);
    let r2 = Arc::clone(&reader);
    let waiter = std::thread::spawn(move || {
        let mut out = vec![];
        loop {
            match r2.next_timeout(Duration::from_millis(5)) {
                Ok(fastfp8_core::Next::Ready(d)) => out.push(d),
                Ok(fastfp8_core::Next::Pending) => {}
                Ok(fastfp8_core::Next::Done) => return Ok(out),
                Err(e) => return Err(e),
            }
        }
    });
    std::thread::sleep(Duration::from_millis(20));
    reader.close();
    assert_eq!(
        reader.live_threads(),
        0,
        "close returned with threads still running"
    );
    let _ = waiter.join().unwrap();
}

/// Item 4: dimensions torch cannot represent, or whose product overflows, are header errors;
/// a zero-size tensor with a huge other dimension is fine and costs nothing.
#[test]
fn dims_beyond_i64_are_header_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("h.safetensors");
    for shape in [
        "[18446744073709551615,0]",
        "[9223372036854775808,0]",
        "[0,9223372036854775808]",
        "[4294967296,4294967296,0]",
        "[3037000500,3037000500,0]",
    ] {
        raw_file(
            &p,
            &format!(r#"{{"t":{{"dtype":"BF16","shape":{shape},"data_offsets":[0,0]}}}}"#),
            0,
        );
        let e = Checkpoint::open(&p).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Header, "{shape}: {e}");
        let msg = e.to_string();
        assert!(
            msg.contains("h.safetensors") && msg.contains("\"t\""),
            "{msg}"
        );
    }
    raw_file(
        &p,
        r#"{"t":{"dtype":"BF16","shape":[35184372088832,0],"data_offsets":[0,0]}}"#,
        0,
    );
    let c = Checkpoint::open(&p).unwrap();
    assert_eq!(c.total_bytes(), 0);
    let _ = Error::Cancelled; // keep the import used
}

/// Item 5: another library installing its own SIGBUS handler after ours (faulthandler) must
/// not disable the guard.
#[test]
fn the_guard_survives_a_later_sigbus_handler() {
    use std::io::Write;
    extern "C" fn other(_: libc::c_int) {
        // SAFETY: _exit is async-signal-safe; reaching it means the guard was bypassed.
        unsafe { libc::_exit(99) };
    }
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(&vec![7u8; 64 * 1024]).unwrap();
    // SAFETY: test-only mapping of a private temp file.
    let map = unsafe { memmap2::Mmap::map(&f) }.unwrap();
    let mut dst = vec![0u8; 64 * 1024];
    assert!(fastfp8_core::sigbus::guarded_copy(&mut dst, &map[..]));
    // SAFETY: installs a plain handler, as faulthandler.enable() would.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = other as *const () as libc::sighandler_t;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()), 0);
    }
    f.set_len(10_000).unwrap();
    // the copy's bytes are read after it: a copy nothing reads may be optimized away (release
    // builds did), and then nothing faults
    let mut dst = vec![1u8; 64 * 1024];
    assert!(!fastfp8_core::sigbus::guarded_copy(&mut dst, &map[..]));
    assert!(dst[16384..].iter().all(|&b| b == 0));
}

/// Item 6: shard names that resolve outside the model directory are refused, except the
/// Hugging Face cache snapshot layout.
#[test]
fn index_shards_escaping_the_model_dir_are_refused_except_hf_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let index = |names: &[(&str, &str)]| {
        let m: Vec<String> = names
            .iter()
            .map(|(k, v)| format!(r#""{k}":"{v}""#))
            .collect();
        format!(r#"{{"weight_map":{{{}}}}}"#, m.join(","))
    };
    // Escape through a symlinked directory.
    let outside = t.join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("s.safetensors"), shard_bytes(&[("a", 4, 1)])).unwrap();
    let model = t.join("model");
    std::fs::create_dir(&model).unwrap();
    symlink(&outside, model.join("sub")).unwrap();
    std::fs::write(
        model.join("model.safetensors.index.json"),
        index(&[("a", "sub/s.safetensors")]),
    )
    .unwrap();
    let e = Checkpoint::open(&model).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Checkpoint, "{e}");
    assert!(e.to_string().contains("sub/s.safetensors"), "{e}");
    // Escape through a symlinked file.
    std::fs::remove_file(model.join("sub")).unwrap();
    symlink(outside.join("s.safetensors"), model.join("s.safetensors")).unwrap();
    std::fs::write(
        model.join("model.safetensors.index.json"),
        index(&[("a", "s.safetensors")]),
    )
    .unwrap();
    let e = Checkpoint::open(&model).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Checkpoint, "{e}");
    // A symlink that stays inside is fine.
    std::fs::remove_file(model.join("s.safetensors")).unwrap();
    std::fs::write(model.join("real.safetensors"), shard_bytes(&[("a", 4, 1)])).unwrap();
    symlink("real.safetensors", model.join("s.safetensors")).unwrap();
    Checkpoint::open(&model).unwrap();

    // The Hugging Face cache: snapshots/<rev>/<file> -> ../../blobs/<hash>.
    let repo = t.join("hub/models--org--m");
    let snap = repo.join("snapshots/abc123");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::write(repo.join("blobs/1111"), shard_bytes(&[("a", 4, 1)])).unwrap();
    std::fs::write(repo.join("blobs/2222"), shard_bytes(&[("b", 4, 2)])).unwrap();
    std::fs::write(
        repo.join("blobs/3333"),
        index(&[("a", "m-1.safetensors"), ("b", "sub/m-2.safetensors")]),
    )
    .unwrap();
    symlink("../../blobs/1111", snap.join("m-1.safetensors")).unwrap();
    std::fs::create_dir(snap.join("sub")).unwrap();
    symlink("../../../blobs/2222", snap.join("sub/m-2.safetensors")).unwrap();
    symlink(
        "../../blobs/3333",
        snap.join("model.safetensors.index.json"),
    )
    .unwrap();
    let c = Checkpoint::open(&snap).unwrap();
    assert_eq!(c.tensors.len(), 2);
    // ...but not a blob of another cached repository.
    let other = t.join("hub/models--org--other/blobs");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("9999"), shard_bytes(&[("b", 4, 2)])).unwrap();
    std::fs::remove_file(snap.join("sub/m-2.safetensors")).unwrap();
    symlink(
        "../../../../models--org--other/blobs/9999",
        snap.join("sub/m-2.safetensors"),
    )
    .unwrap();
    let e = Checkpoint::open(&snap).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Checkpoint, "{e}");
}
