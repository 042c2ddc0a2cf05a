//! Property-based fuzzing of everything a hostile checkpoint can reach: the header parser
//! (structured JSON headers built from plausible and implausible pieces, mutated valid
//! headers, raw bytes), whole files with any header length, index resolution
//! (`Checkpoint::open` on directories with random `model.safetensors.index.json` files), and
//! read plans. Every case asserts that nothing panics, that an accepted input satisfies the
//! format's invariants, and that no allocation is sized from an unvalidated number in the
//! file (a counting global allocator records the largest single allocation per thread).
//!
//! CI runs a bounded number of cases (a few seconds in all). For a long run by hand:
//! `FASTFP8_FUZZ_CASES=200000 cargo test --release -p fastfp8-core --test fuzz_props`.
//! The libFuzzer target for open-ended runs is in `rust/core/fuzz`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::{BTreeMap, HashSet};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use fastfp8_core::checkpoint::INDEX_FILE;
use fastfp8_core::header::{parse_header, Header, MAX_HEADER_LEN};
use fastfp8_core::plan::{ReadItem, Segment};
use fastfp8_core::reader::{DestBuffer, Next, Reader, ReaderConfig};
use fastfp8_core::{Checkpoint, Dtype, ErrorKind, Shard};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;

// ---------------------------------------------------------------------------------------
// The largest single allocation made by this thread while tracking is on.

struct Counting;

thread_local! {
    // const-initialized and without destructors: safe to touch from the allocator.
    static TRACK: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = TRACK.try_with(|t| {
        if t.get() {
            let _ = LARGEST.try_with(|m| m.set(m.get().max(size)));
        }
    });
}

// SAFETY: forwards to the system allocator unchanged; only records sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns its result with the largest single allocation it made.
fn largest_alloc<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|m| m.set(0));
    TRACK.with(|t| t.set(true));
    let out = f();
    TRACK.with(|t| t.set(false));
    (out, LARGEST.with(|m| m.get()))
}

/// What parsing `input_len` bytes of header may allocate at most in one piece: a small
/// multiple of the input (strings, shape vectors, the entry list), never anything sized by a
/// shape, an offset or a length read from the file.
fn alloc_bound(input_len: usize) -> usize {
    64 * input_len + (64 << 10)
}

// ---------------------------------------------------------------------------------------
// Case counts.

/// Cases per property: `default` in CI, or `FASTFP8_FUZZ_CASES` for long runs by hand.
fn cases(default: u32) -> u32 {
    std::env::var("FASTFP8_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn config(default: u32) -> ProptestConfig {
    ProptestConfig {
        cases: cases(default),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------
// Invariants of an accepted header.

const DTYPES: [&str; 20] = [
    "BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64",
    "C64", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2",
];

/// Checks everything an accepted header promises; returns a description of the first broken
/// promise.
fn check_header(h: &Header, header_len: usize, file_size: u64) -> Result<(), String> {
    if h.data_start != 8 + header_len as u64 {
        return Err(format!(
            "data_start {} for a {header_len}-byte header",
            h.data_start
        ));
    }
    let data_len = file_size - h.data_start;
    let mut names = HashSet::new();
    for t in &h.tensors {
        if !names.insert(t.name.as_str()) {
            return Err(format!("tensor {:?} twice", t.name));
        }
        if t.name == "__metadata__" {
            return Err("__metadata__ taken as a tensor".into());
        }
        if t.end < t.begin {
            return Err(format!("{:?}: reversed offsets", t.name));
        }
        let numel = t.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        let want = numel.and_then(|n| t.dtype.nbytes(n));
        if !fits_torch(&t.shape) {
            return Err(format!(
                "{:?}: shape {:?} beyond torch's i64",
                t.name, t.shape
            ));
        }
        if want != Some(t.nbytes()) {
            return Err(format!(
                "{:?}: {} bytes for {} {:?}",
                t.name,
                t.nbytes(),
                t.dtype,
                t.shape
            ));
        }
        if t.dtype.name().parse::<Dtype>() != Ok(t.dtype) {
            return Err(format!("{:?}: dtype does not round-trip", t.name));
        }
    }
    let mut spans: Vec<(u64, u64)> = h.tensors.iter().map(|t| (t.begin, t.end)).collect();
    spans.sort();
    let mut cursor = 0u64;
    for (b, e) in spans {
        if b != cursor {
            return Err(format!("tensor at {b} where {cursor} was expected"));
        }
        cursor = e;
    }
    if cursor != data_len {
        return Err(format!("tensors cover {cursor} of {data_len} data bytes"));
    }
    Ok(())
}

/// Every dimension, and the product of the nonzero ones, fits torch's i64 sizes.
fn fits_torch(shape: &[u64]) -> bool {
    shape
        .iter()
        .filter(|&&d| d != 0)
        .try_fold(1u64, |a, &d| {
            a.checked_mul(d).filter(|&p| p <= i64::MAX as u64)
        })
        .is_some()
}

/// Parses `header` as the header of a file with `data_len` data bytes, checking the
/// invariants of a success and the allocation bound either way.
fn parse_checked(header: &[u8], data_len: u64) -> Result<Option<Header>, TestCaseError> {
    let file_size = 8 + header.len() as u64 + data_len;
    let (res, largest) =
        largest_alloc(|| parse_header(Path::new("fuzz.safetensors"), header, file_size));
    prop_assert!(
        largest <= alloc_bound(header.len()),
        "parsing {} header bytes allocated {largest} bytes at once",
        header.len()
    );
    match res {
        Ok(h) => {
            if let Err(broken) = check_header(&h, header.len(), file_size) {
                return Err(TestCaseError::fail(format!(
                    "accepted a header that breaks the format ({broken}): {}",
                    String::from_utf8_lossy(header)
                )));
            }
            Ok(Some(h))
        }
        Err(e) => {
            prop_assert_eq!(e.kind(), ErrorKind::Header, "{}", e);
            prop_assert!(e.to_string().contains("fuzz.safetensors"), "{}", e);
            Ok(None)
        }
    }
}

// ---------------------------------------------------------------------------------------
// Structured headers.

/// Numbers where overflow bugs live.
fn edgy_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0u64..5,
        2 => 0u64..5000,
        1 => Just(u32::MAX as u64),
        1 => Just(1u64 << 32),
        1 => Just((1u64 << 32) + 1),
        1 => Just(1u64 << 62),
        1 => Just(1u64 << 63),
        1 => Just(u64::MAX / 2 + 1),
        1 => Just(u64::MAX - 1),
        1 => Just(u64::MAX),
        1 => Just(MAX_HEADER_LEN),
        1 => any::<u64>(),
    ]
}

/// A JSON value that is not what the field wants.
fn wrong_json() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("null".to_string()),
        Just("true".to_string()),
        Just("-1".to_string()),
        Just("1.5".to_string()),
        Just("1e300".to_string()),
        Just("18446744073709551616".to_string()), // u64::MAX + 1
        Just("\"F32\"".to_string()),
        Just("[]".to_string()),
        Just("[[1]]".to_string()),
        Just("{}".to_string()),
        Just("[-3, 4]".to_string()),
        Just("[1, 2, 3]".to_string()),
        Just("[\"1\", \"2\"]".to_string()),
    ]
}

#[derive(Debug, Clone)]
enum Field {
    /// The right value (the dtype name, the shape, offsets that tile).
    Good,
    Missing,
    /// A right-typed but chosen value.
    Value(String),
    /// A wrong-typed JSON value.
    Wrong(String),
}

fn field(value: impl Strategy<Value = String>) -> impl Strategy<Value = Field> {
    prop_oneof![
        12 => Just(Field::Good),
        1 => Just(Field::Missing),
        2 => value.prop_map(Field::Value),
        1 => wrong_json().prop_map(Field::Wrong),
    ]
}

#[derive(Debug, Clone)]
struct TensorSpec {
    name: String,
    dtype: usize,
    shape: Vec<u64>,
    dtype_field: Field,
    shape_field: Field,
    offsets_field: Field,
    extra_field: bool,
    /// Emits the fields in reverse order.
    reversed: bool,
}

fn tensor_name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "w", "a.weight", "b.weight", "model.layers.0.mlp.down_proj.weight", "",
            "__metadata__", "é", "with \\\"quote\\\"", "nul\\u0000", "\\ud83d\\ude00",
        ])
        .prop_map(String::from),
        3 => "[a-z]{1,3}",
        1 => "[a-zA-Z0-9_.]{0,12}",
    ]
}

fn shape() -> impl Strategy<Value = Vec<u64>> {
    prop_oneof![
        6 => prop::collection::vec(0u64..9, 0..4),
        2 => prop::collection::vec(edgy_u64(), 0..4),
        1 => prop::collection::vec(1u64..3, 0..70), // long shapes: products overflow late
    ]
}

fn tensor_spec() -> impl Strategy<Value = TensorSpec> {
    (
        tensor_name(),
        0..DTYPES.len(),
        shape(),
        field(
            prop::sample::select(vec![
                "bf16",
                "F12",
                "",
                "F8_E4M3FN",
                "float32",
                "BF16 ",
                "U8\\u0000",
            ])
            .prop_map(|s| format!("\"{s}\"")),
        ),
        field(prop::collection::vec(edgy_u64(), 0..4).prop_map(|v| format!("{v:?}"))),
        field((edgy_u64(), edgy_u64()).prop_map(|(a, b)| format!("[{a},{b}]"))),
        prop::bool::weighted(0.05),
        prop::bool::weighted(0.2),
    )
        .prop_map(
            |(
                name,
                dtype,
                shape,
                dtype_field,
                shape_field,
                offsets_field,
                extra_field,
                reversed,
            )| {
                TensorSpec {
                    name,
                    dtype,
                    shape,
                    dtype_field,
                    shape_field,
                    offsets_field,
                    extra_field,
                    reversed,
                }
            },
        )
}

#[derive(Debug, Clone)]
enum Meta {
    None,
    Good(BTreeMap<String, String>),
    Null,
    Wrong(String),
}

fn metadata() -> impl Strategy<Value = Meta> {
    prop_oneof![
        4 => Just(Meta::None),
        3 => prop::collection::btree_map("[a-z]{0,4}", "[ -~]{0,6}", 0..4).prop_map(Meta::Good),
        1 => Just(Meta::Null),
        1 => prop_oneof![
            Just(r#"{"a":1}"#.to_string()),
            Just(r#"{"a":{"b":"c"}}"#.to_string()),
            Just(r#"["format","pt"]"#.to_string()),
            Just(r#""pt""#.to_string()),
        ]
        .prop_map(Meta::Wrong),
    ]
}

#[derive(Debug, Clone)]
struct HeaderSpec {
    tensors: Vec<TensorSpec>,
    meta: Meta,
    meta_at: usize,
    /// Added to the exact data length (wrapping), 0 most of the time.
    data_delta: i64,
    padding: usize,
    /// Appended after the JSON object.
    junk: Option<String>,
    /// Data order: a permutation seed, so that header order and data order differ.
    shuffle: u64,
}

fn header_spec() -> impl Strategy<Value = HeaderSpec> {
    (
        prop::collection::vec(tensor_spec(), 0..7),
        metadata(),
        0usize..8,
        prop_oneof![8 => Just(0i64), 1 => -3i64..4, 1 => any::<i64>()],
        prop_oneof![4 => Just(0usize), 1 => 0usize..9],
        prop_oneof![
            12 => Just(None),
            1 => prop::sample::select(vec!["x", "{}", ",", "\u{0}", "   \n"]).prop_map(|s| Some(s.to_string())),
        ],
        any::<u64>(),
    )
        .prop_map(|(tensors, meta, meta_at, data_delta, padding, junk, shuffle)| HeaderSpec {
            tensors,
            meta,
            meta_at,
            data_delta,
            padding,
            junk,
            shuffle,
        })
}

/// The header text, the data length, and the tensors a correct parser must return when
/// the spec has no deliberate fault (None when it has one, or when the outcome is not
/// obvious: e.g. sizes that overflow).
type Expected = Option<Vec<(String, Dtype, Vec<u64>, u64, u64)>>;

fn render(spec: &HeaderSpec) -> (String, u64, Expected) {
    let mut clean = spec.data_delta == 0 && spec.junk.is_none();
    // Data order: tensors laid out in a shuffled order (offsets tile in that order).
    let n = spec.tensors.len();
    let mut order: Vec<usize> = (0..n).collect();
    let mut seed = spec.shuffle | 1;
    for i in (1..n).rev() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        order.swap(i, (seed % (i as u64 + 1)) as usize);
    }
    let mut begin = vec![0u64; n];
    let mut size = vec![None; n];
    let mut cursor = Some(0u64);
    for &i in &order {
        let t = &spec.tensors[i];
        let dtype: Dtype = DTYPES[t.dtype].parse().unwrap();
        let nbytes = t
            .shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .and_then(|n| dtype.nbytes(n))
            .filter(|_| fits_torch(&t.shape));
        size[i] = nbytes;
        match (cursor, nbytes) {
            (Some(c), Some(s)) => {
                begin[i] = c;
                cursor = c.checked_add(s);
            }
            _ => cursor = None,
        }
    }
    let exact = cursor.unwrap_or(0);
    if cursor.is_none() || exact > (1 << 40) {
        clean = false; // sizes overflow, or a file no one would write
    }
    let mut names = HashSet::new();
    let mut entries = Vec::new();
    let mut expected = Vec::new();
    for (i, t) in spec.tensors.iter().enumerate() {
        let dtype: Dtype = DTYPES[t.dtype].parse().unwrap();
        if !names.insert(t.name.clone()) || t.name == "__metadata__" {
            clean = false;
        }
        let mut fields = Vec::new();
        let mut put = |key: &str, f: &Field, good: String| match f {
            Field::Good => fields.push(format!("\"{key}\":{good}")),
            Field::Missing => clean = false,
            Field::Value(v) | Field::Wrong(v) => {
                clean = false;
                fields.push(format!("\"{key}\":{v}"))
            }
        };
        put("dtype", &t.dtype_field, format!("\"{}\"", DTYPES[t.dtype]));
        put("shape", &t.shape_field, format!("{:?}", t.shape));
        let end = begin[i].wrapping_add(size[i].unwrap_or(0));
        put(
            "data_offsets",
            &t.offsets_field,
            format!("[{},{}]", begin[i], end),
        );
        if t.extra_field {
            fields.push("\"extra\":1".into()); // unknown fields are ignored, like safetensors
        }
        if t.reversed {
            fields.reverse();
        }
        entries.push(format!("\"{}\":{{{}}}", t.name, fields.join(",")));
        expected.push((unescape(&t.name), dtype, t.shape.clone(), begin[i], end));
    }
    let meta = match &spec.meta {
        Meta::None => None,
        Meta::Good(m) => Some(serde_json::to_string(m).unwrap()),
        Meta::Null => Some("null".into()),
        Meta::Wrong(w) => {
            clean = false;
            Some(w.clone())
        }
    };
    if let Some(m) = meta {
        entries.insert(
            spec.meta_at.min(entries.len()),
            format!("\"__metadata__\":{m}"),
        );
    }
    let mut text = format!("{{{}}}", entries.join(","));
    text.push_str(&" ".repeat(spec.padding));
    if let Some(j) = &spec.junk {
        text.push_str(j);
    }
    let data_len = (exact as i64).wrapping_add(spec.data_delta) as u64;
    let data_len = data_len.min(1 << 40);
    if data_len != exact {
        clean = false;
    }
    (text, data_len, clean.then_some(expected))
}

/// The few escapes `tensor_name` uses, decoded.
fn unescape(s: &str) -> String {
    serde_json::from_str(&format!("\"{s}\"")).unwrap_or_else(|_| s.to_string())
}

#[test]
fn structured_headers() {
    let mut runner = TestRunner::new(config(3000));
    let accepted = std::cell::Cell::new(0u32);
    runner
        .run(&header_spec(), |spec| {
            let (text, data_len, expected) = render(&spec);
            let parsed = parse_checked(text.as_bytes(), data_len)?;
            if let Some(expected) = expected {
                // No fault was put in: a correct parser must accept it, unchanged.
                let Some(h) = &parsed else {
                    return Err(TestCaseError::fail(format!(
                        "rejected a valid header: {text}"
                    )));
                };
                let got: Vec<_> = h
                    .tensors
                    .iter()
                    .map(|t| (t.name.clone(), t.dtype, t.shape.clone(), t.begin, t.end))
                    .collect();
                prop_assert_eq!(got, expected);
                if let Meta::Good(m) = &spec.meta {
                    prop_assert_eq!(h.metadata.as_ref(), Some(m));
                }
            }
            if parsed.is_some() {
                accepted.set(accepted.get() + 1);
            }
            Ok(())
        })
        .unwrap();
    // The generator must reach the accepting paths, not only the error paths.
    assert!(
        accepted.get() >= cases(3000) / 20,
        "only {} accepted",
        accepted.get()
    );
}

proptest! {
    #![proptest_config(config(3000))]

    /// Valid headers with bytes flipped, inserted or removed.
    #[test]
    fn mutated_headers(
        spec in header_spec(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), 0u8..3, any::<u8>()), 1..6),
    ) {
        let (text, data_len, _) = render(&spec);
        let mut bytes = text.into_bytes();
        for (at, op, b) in edits {
            match op {
                0 if !bytes.is_empty() => { let i = at.index(bytes.len()); bytes[i] = b; }
                1 => { let i = at.index(bytes.len() + 1); bytes.insert(i, b); }
                _ if !bytes.is_empty() => { let i = at.index(bytes.len()); bytes.remove(i); }
                _ => {}
            }
        }
        parse_checked(&bytes, data_len)?;
    }

    /// Raw bytes as a header, and as JSON-ish text.
    #[test]
    fn raw_header_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        text in "[{}\\[\\]\",:0-9a-zA-Z_ .\\-]{0,200}",
        data_len in prop_oneof![Just(0u64), 0u64..64, Just(1u64 << 40)],
    ) {
        parse_checked(&bytes, data_len)?;
        parse_checked(text.as_bytes(), data_len)?;
    }
}

// ---------------------------------------------------------------------------------------
// Whole files: the header length is read from the file.

proptest! {
    #![proptest_config(config(300))]

    /// Any 8-byte header length, with a header and data of any size: `Shard::open` never
    /// allocates more than the file holds (plus a bound for parsing what is there).
    #[test]
    fn any_header_length_in_a_file(
        len in prop_oneof![edgy_u64(), 0u64..64],
        spec in header_spec(),
        extra in 0usize..64,
    ) {
        let (text, data_len, _) = render(&spec);
        let data_len = data_len.min(4096) as usize + extra;
        let mut bytes = len.to_le_bytes().to_vec();
        bytes.extend_from_slice(text.as_bytes());
        bytes.resize(bytes.len() + data_len, 0x5a);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.safetensors");
        std::fs::write(&p, &bytes).unwrap();
        let (res, largest) = largest_alloc(|| Shard::open(&p));
        prop_assert!(
            largest <= bytes.len() + alloc_bound(bytes.len()),
            "a {}-byte file claiming a {len}-byte header made a {largest}-byte allocation",
            bytes.len()
        );
        match res {
            Ok(s) => {
                prop_assert!(len <= MAX_HEADER_LEN && len + 8 <= bytes.len() as u64);
                prop_assert_eq!(s.size, bytes.len() as u64);
                if let Err(b) = check_header(&s.header, len as usize, s.size) {
                    return Err(TestCaseError::fail(b));
                }
            }
            Err(e) => prop_assert_eq!(e.kind(), ErrorKind::Header, "{}", e),
        }
    }
}

#[test]
fn huge_header_lengths_allocate_nothing_big() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("h.safetensors");
    for len in [
        u64::MAX,
        1 << 63,
        MAX_HEADER_LEN + 1,
        MAX_HEADER_LEN,
        1 << 30,
        100,
        9,
    ] {
        let mut bytes = len.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        std::fs::write(&p, &bytes).unwrap();
        let (res, largest) = largest_alloc(|| Shard::open(&p));
        let err = res.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Header, "{err}");
        assert!(
            largest < 64 << 10,
            "{len}: allocated {largest} bytes at once"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Index resolution.

/// Writes a shard of U8 tensors.
fn write_shard(path: &Path, tensors: &[(&str, usize)]) {
    let mut header = Vec::new();
    let mut off = 0;
    for (name, len) in tensors {
        header.push(format!(
            r#""{name}":{{"dtype":"U8","shape":[{len}],"data_offsets":[{off},{}]}}"#,
            off + len
        ));
        off += len;
    }
    let header = format!("{{{}}}", header.join(","));
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.resize(bytes.len() + off, 3);
    std::fs::write(path, bytes).unwrap();
}

/// A model directory next to things it must never reach:
///
/// ```text
/// outside.safetensors            tensor "o" (outside the model directory)
/// blobs/blob1                    tensor "s1" (a Hugging Face cache blob)
/// model = snapshots/rev/         the model directory, a Hugging Face cache snapshot
/// model/a.safetensors            "a0", "a1"
/// model/b.safetensors            "b0"
/// model/sub/c.safetensors        "c0"
/// model/link.safetensors  ->  ../../blobs/blob1      (allowed: the cache layout)
/// model/escape.safetensors -> ../../outside.safetensors  (refused: outside the model)
/// model/dirshard/                a directory
/// model/bad.safetensors          garbage
/// ```
struct Dirs {
    _tmp: tempfile::TempDir,
    base: PathBuf,
    model: PathBuf,
}

fn layout() -> Dirs {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().to_path_buf();
    let model = base.join("snapshots/rev");
    std::fs::create_dir_all(model.join("sub")).unwrap();
    std::fs::create_dir_all(model.join("dirshard")).unwrap();
    std::fs::create_dir_all(base.join("blobs")).unwrap();
    write_shard(&base.join("outside.safetensors"), &[("o", 3)]);
    write_shard(&base.join("blobs/blob1"), &[("s1", 5)]);
    write_shard(&model.join("a.safetensors"), &[("a0", 4), ("a1", 2)]);
    write_shard(&model.join("b.safetensors"), &[("b0", 1)]);
    write_shard(&model.join("sub/c.safetensors"), &[("c0", 7)]);
    std::os::unix::fs::symlink("../../blobs/blob1", model.join("link.safetensors")).unwrap();
    std::os::unix::fs::symlink(
        "../../outside.safetensors",
        model.join("escape.safetensors"),
    )
    .unwrap();
    std::fs::write(
        model.join("bad.safetensors"),
        b"\xff\xff\xff\xff\xff\xff\xff\xff{",
    )
    .unwrap();
    Dirs {
        _tmp: tmp,
        base,
        model,
    }
}

/// Which tensors each real shard holds (by the name the index would use).
fn shard_tensors(rel: &str) -> Option<&'static [&'static str]> {
    let clean: PathBuf = Path::new(rel)
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect();
    match clean.to_str()? {
        "a.safetensors" => Some(&["a0", "a1"]),
        "b.safetensors" => Some(&["b0"]),
        "sub/c.safetensors" => Some(&["c0"]),
        "link.safetensors" => Some(&["s1"]),
        _ => None,
    }
}

#[derive(Debug, Clone)]
enum MapValue {
    Str(String),
    /// Replaced by the absolute path of `outside.safetensors` when rendered.
    AbsOutside,
    /// Replaced by the absolute path of `model/a.safetensors` (inside, but absolute).
    AbsInside,
    Json(String),
}

fn map_value() -> impl Strategy<Value = MapValue> {
    prop_oneof![
        10 => prop::sample::select(vec![
            "a.safetensors", "b.safetensors", "sub/c.safetensors", "link.safetensors",
            "escape.safetensors",
        ]).prop_map(|s| MapValue::Str(s.into())),
        6 => prop::sample::select(vec![
            "./a.safetensors", "sub/./c.safetensors", "sub//c.safetensors", "a.safetensors/",
            "../outside.safetensors", "sub/../a.safetensors", "../rev/a.safetensors",
            "../../etc/passwd", "..", ".", "", "/", "//a.safetensors", "/etc/passwd",
            "dirshard", "missing.safetensors", "bad.safetensors", "model.safetensors.index.json",
            "sub", "a.safetensors\\u0000x", "..\\\\outside.safetensors", "~/a.safetensors",
            "C:\\\\a.safetensors", "sub/c.safetensors/..", "./../outside.safetensors",
        ]).prop_map(|s| MapValue::Str(s.into())),
        1 => Just(MapValue::AbsOutside),
        1 => Just(MapValue::AbsInside),
        1 => "[a-z./]{0,10}".prop_map(MapValue::Str),
        1 => prop::sample::select(vec!["1", "null", "true", "[]", "{}", "[\"a.safetensors\"]", "-0"])
            .prop_map(|s| MapValue::Json(s.into())),
    ]
}

#[derive(Debug, Clone)]
enum IndexShape {
    /// `{"metadata": ..., "weight_map": {...}}`
    Normal {
        metadata: bool,
    },
    NoWeightMap,
    WeightMapIs(String),
    RawBytes(Vec<u8>),
    /// The weight map's object repeats its first key (serde keeps the last).
    DuplicateKey,
}

fn index_shape() -> impl Strategy<Value = IndexShape> {
    prop_oneof![
        16 => any::<bool>().prop_map(|metadata| IndexShape::Normal { metadata }),
        1 => Just(IndexShape::NoWeightMap),
        1 => prop::sample::select(vec!["null", "[]", "\"a.safetensors\"", "1", "[[\"a0\",\"a.safetensors\"]]"])
            .prop_map(|s| IndexShape::WeightMapIs(s.into())),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(IndexShape::RawBytes),
        1 => Just(IndexShape::DuplicateKey),
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::sample::select(vec!["a0", "a1", "b0", "c0", "s1", "o", "zz", ""]).prop_map(String::from),
        1 => "[a-z0-9.]{0,6}",
    ]
}

#[derive(Debug, Clone)]
struct IndexSpec {
    shape: IndexShape,
    map: Vec<(String, MapValue)>,
}

fn index_spec() -> impl Strategy<Value = IndexSpec> {
    (
        index_shape(),
        prop::collection::vec((key(), map_value()), 0..7),
    )
        .prop_map(|(shape, map)| IndexSpec { shape, map })
}

fn json_str(s: &str) -> String {
    // The pool's strings are already JSON-escaped where needed.
    format!("\"{s}\"")
}

/// Renders the index; also returns the weight map a JSON parser sees (last key wins), with
/// string values only (None when a value is not a string).
fn render_index(spec: &IndexSpec, l: &Dirs) -> (Vec<u8>, Option<BTreeMap<String, String>>) {
    let value = |v: &MapValue| match v {
        MapValue::Str(s) => (json_str(s), Some(unescape(s))),
        MapValue::AbsOutside => {
            let p = l.base.join("outside.safetensors").display().to_string();
            (serde_json::to_string(&p).unwrap(), Some(p))
        }
        MapValue::AbsInside => {
            let p = l.model.join("a.safetensors").display().to_string();
            (serde_json::to_string(&p).unwrap(), Some(p))
        }
        MapValue::Json(j) => (j.clone(), None),
    };
    let mut parsed = Some(BTreeMap::new());
    let mut pairs = Vec::new();
    for (k, v) in &spec.map {
        let (text, s) = value(v);
        pairs.push(format!("{}:{text}", json_str(k)));
        match (s, parsed.as_mut()) {
            (Some(s), Some(m)) => {
                m.insert(k.clone(), s);
            }
            _ => parsed = None,
        }
    }
    let map = format!("{{{}}}", pairs.join(","));
    let text = match &spec.shape {
        IndexShape::Normal { metadata: true } => {
            format!(r#"{{"metadata":{{"total_size":12}},"weight_map":{map}}}"#)
        }
        IndexShape::Normal { metadata: false } => format!(r#"{{"weight_map":{map}}}"#),
        IndexShape::NoWeightMap => {
            return (br#"{"metadata":{}}"#.to_vec(), None);
        }
        IndexShape::WeightMapIs(w) => {
            return (format!(r#"{{"weight_map":{w}}}"#).into_bytes(), None)
        }
        IndexShape::RawBytes(b) => return (b.clone(), None),
        IndexShape::DuplicateKey => {
            let Some((k, v)) = spec.map.first() else {
                return (br#"{"weight_map":{}}"#.to_vec(), parsed);
            };
            let (text, s) = value(v);
            if let (Some(s), Some(m)) = (s, parsed.as_mut()) {
                m.insert(k.clone(), s); // appended last: it wins
            }
            let dup = format!("{}:{text}", json_str(k));
            let map = if pairs.is_empty() {
                format!("{{{dup}}}")
            } else {
                format!("{{{},{dup}}}", pairs.join(","))
            };
            format!(r#"{{"weight_map":{map}}}"#)
        }
    };
    (text.into_bytes(), parsed)
}

fn unsafe_name(name: &str) -> bool {
    name.is_empty()
        || Path::new(name)
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
}

/// `Checkpoint::open` on one random index; checks the invariants of a success, and that
/// an unsafe or dangling name never resolves.
fn check_index(spec: &IndexSpec) -> Result<(), TestCaseError> {
    let l = layout();
    let (bytes, map) = render_index(spec, &l);
    std::fs::write(l.model.join(INDEX_FILE), &bytes).unwrap();
    let res = Checkpoint::open(&l.model);
    let ckpt = match res {
        Ok(c) => c,
        Err(e) => {
            prop_assert!(
                matches!(
                    e.kind(),
                    ErrorKind::Checkpoint
                        | ErrorKind::Header
                        | ErrorKind::NotFound
                        | ErrorKind::Read
                ) || matches!(e, fastfp8_core::Error::Invalid(_)),
                "{}",
                e
            );
            return Ok(());
        }
    };
    let Some(map) = map else {
        return Err(TestCaseError::fail(format!(
            "accepted an index with no valid weight map: {}",
            String::from_utf8_lossy(&bytes)
        )));
    };
    let index = l.model.join(INDEX_FILE);
    prop_assert_eq!(ckpt.index.as_deref(), Some(index.as_path()));
    for name in map.values() {
        prop_assert!(
            !unsafe_name(name),
            "resolved the unsafe shard name {:?}",
            name
        );
    }
    // Every shard: a plain relative name inside the model directory, one of the real ones.
    let names: HashSet<&str> = map.values().map(String::as_str).collect();
    prop_assert_eq!(ckpt.shards.len(), names.len());
    for shard in &ckpt.shards {
        let rel = shard.path.strip_prefix(&l.model);
        prop_assert!(rel.is_ok(), "shard {:?} outside {:?}", shard.path, l.model);
        let rel = rel.unwrap();
        prop_assert!(
            rel.components()
                .all(|c| matches!(c, Component::Normal(_) | Component::CurDir)),
            "shard {:?}",
            shard.path
        );
        prop_assert!(
            shard_tensors(rel.to_str().unwrap()).is_some(),
            "shard {:?}",
            shard.path
        );
        let real = std::fs::canonicalize(&shard.path).unwrap();
        prop_assert!(
            real.starts_with(std::fs::canonicalize(&l.model).unwrap())
                || real == std::fs::canonicalize(l.base.join("blobs/blob1")).unwrap(),
            "shard {:?} resolves to {:?}",
            shard.path,
            real
        );
        if let Err(b) = check_header(
            &shard.header,
            (shard.header.data_start - 8) as usize,
            shard.size,
        ) {
            return Err(TestCaseError::fail(b));
        }
    }
    // Every tensor of every shard is indexed exactly once; every indexed tensor is where
    // the index says.
    let mut total = 0;
    for (name, file) in &map {
        let r = ckpt.find(name);
        prop_assert!(r.is_ok(), "{:?} not found", name);
        let r = r.unwrap();
        prop_assert_eq!(&ckpt.shards[r.shard].path, &l.model.join(file));
        prop_assert_eq!(&ckpt.info(r).name, name);
        prop_assert!(shard_tensors(file).unwrap().contains(&name.as_str()));
        prop_assert!(
            name != "o",
            "reached the tensor outside the model directory"
        );
    }
    for &r in &ckpt.tensors {
        total += ckpt.info(r).nbytes();
        prop_assert_eq!(ckpt.find(&ckpt.info(r).name).unwrap(), r);
    }
    prop_assert_eq!(ckpt.total_bytes(), total);
    Ok(())
}

proptest! {
    #![proptest_config(config(400))]

    #[test]
    fn random_index_files(spec in index_spec()) {
        check_index(&spec)?;
    }
}

/// Handwritten cases the properties above must keep covering: the Hugging Face layout
/// resolves, and every escape is refused.
#[test]
fn index_regressions() {
    use MapValue::*;
    let ok = |m: Vec<(&str, MapValue)>| IndexSpec {
        shape: IndexShape::Normal { metadata: true },
        map: m.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
    };
    let s = |v: &str| Str(v.to_string());
    let all = vec![
        ("a0", s("a.safetensors")),
        ("a1", s("a.safetensors")),
        ("b0", s("b.safetensors")),
        ("c0", s("sub/c.safetensors")),
        ("s1", s("link.safetensors")),
    ];
    let l = layout();
    let (bytes, _) = render_index(&ok(all.clone()), &l);
    std::fs::write(l.model.join(INDEX_FILE), &bytes).unwrap();
    let c = Checkpoint::open(&l.model).unwrap();
    assert_eq!(c.shards.len(), 4);
    assert_eq!(c.tensors.len(), 5);
    check_index(&ok(all)).unwrap();
    for bad in [
        s("../outside.safetensors"),
        s("sub/../a.safetensors"),
        s("./../outside.safetensors"),
        s("/etc/passwd"),
        s(""),
        s(".."),
        AbsOutside,
        AbsInside,
    ] {
        let l = layout();
        let (bytes, _) = render_index(&ok(vec![("a0", bad.clone())]), &l);
        std::fs::write(l.model.join(INDEX_FILE), &bytes).unwrap();
        let err = Checkpoint::open(&l.model).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Checkpoint, "{bad:?}: {err}");
        assert!(
            err.to_string().contains("not a plain relative path"),
            "{bad:?}: {err}"
        );
    }
}

/// A named pipe in a hostile model directory, listed as a shard, must be an error, not an
/// `open()` that waits forever for a writer.
#[test]
fn fifo_shard_is_an_error_not_a_hang() {
    let l = layout();
    let fifo = l.model.join("pipe.safetensors");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    std::fs::write(
        l.model.join(INDEX_FILE),
        r#"{"weight_map":{"a0":"pipe.safetensors"}}"#,
    )
    .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let model = l.model.clone();
    std::thread::spawn(move || {
        let _ = tx.send(Checkpoint::open(&model).map(|_| ()));
    });
    let res = rx.recv_timeout(std::time::Duration::from_secs(5));
    if res.is_err() {
        // Unblock the stuck open() so the thread can finish, then fail.
        let _ = std::fs::OpenOptions::new().write(true).open(&fifo);
        panic!("Checkpoint::open blocked on a FIFO named by the index");
    }
    let err = res.unwrap().unwrap_err();
    assert!(err.to_string().contains("pipe.safetensors"), "{err}");
    // A fastfp8.CheckpointError in Python, like every other bad index (not a ValueError).
    assert_eq!(err.kind(), ErrorKind::Checkpoint, "{err}");
}

/// `parse_header` is public: a file size smaller than the header it is given is an error,
/// not an arithmetic overflow (a panic in debug builds, a wrapped length in release).
#[test]
fn parse_header_with_too_small_a_file_size_is_an_error() {
    let header = br#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
    for size in [0, 8, 8 + header.len() as u64 - 1] {
        let res = std::panic::catch_unwind(|| parse_header(Path::new("s"), header, size));
        let res = res.unwrap_or_else(|_| panic!("parse_header panicked for a file size of {size}"));
        assert_eq!(res.unwrap_err().kind(), ErrorKind::Header);
    }
}

// ---------------------------------------------------------------------------------------
// Read plans: the bindings pass any (shard, offset, len) from Python.

proptest! {
    #![proptest_config(config(200))]

    #[test]
    fn random_read_plans(
        segs in prop::collection::vec(
            prop::collection::vec((0usize..3, edgy_u64(), edgy_u64()), 0..3), 0..4),
        budget in prop_oneof![Just(0u64), 1u64..64, Just(4096u64)],
        chunk in prop_oneof![Just(None), (1u64..40).prop_map(Some), Just(Some(0u64))],
        threads in 0usize..3,
        merge_bytes in prop_oneof![Just(0u64), 1u64..100],
        background in prop::collection::vec(any::<bool>(), 4),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.safetensors");
        write_shard(&p, &[("t", 37), ("u", 11)]);
        let ckpt = Arc::new(Checkpoint::open(&p).unwrap());
        let size = ckpt.shards[0].size;
        let items: Vec<ReadItem> = segs
            .iter()
            .enumerate()
            .map(|(i, s)| ReadItem {
                name: format!("i{i}"),
                segments: s
                    .iter()
                    // bias towards in-range segments
                    .map(|&(shard, off, len)| Segment { shard, offset: off % (size + 2), len: len % 50 })
                    .collect(),
                quant: None,
                amax: None,
                optional: false,
                // chunks spread between the others' (their own still in order)
                background: background[i],
            })
            .collect();
        let mut buf = vec![0u8; budget as usize];
        let base = buf.as_mut_ptr();
        // SAFETY: buf outlives the reader (dropped before it) and is only touched through
        // `base` meanwhile.
        let dest = unsafe { DestBuffer::new(base, budget) };
        let cfg = ReaderConfig { threads, chunk_bytes: chunk, piece_bytes: 7, merge_bytes, ..Default::default() };
        let Ok(reader) = Reader::start(Arc::clone(&ckpt), items.clone(), dest, cfg) else {
            return Ok(());
        };
        let file = std::fs::read(&p).unwrap();
        let mut got: Vec<Vec<u8>> = vec![Vec::new(); items.len()];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            prop_assert!(std::time::Instant::now() < deadline, "the reader hangs");
            match reader.next_timeout(std::time::Duration::from_millis(50)) {
                Ok(Next::Pending) => continue,
                Ok(Next::Ready(d)) => {
                    // SAFETY: a delivered region, ours until released.
                    let bytes = unsafe {
                        std::slice::from_raw_parts(base.add(d.buf_offset as usize), d.len as usize)
                    };
                    // deliveries (merged or not) continue their item
                    prop_assert_eq!(d.item_offset as usize, got[d.item].len());
                    got[d.item].extend_from_slice(bytes);
                    reader.release(d.buf_offset, d.len).unwrap();
                }
                Ok(Next::Done) => break,
                Err(e) => {
                    prop_assert!(matches!(e.kind(), ErrorKind::Budget | ErrorKind::Invalid), "{}", e);
                    return Ok(());
                }
            }
        }
        drop(reader);
        for (item, bytes) in items.iter().zip(&got) {
            let want: Vec<u8> = item
                .segments
                .iter()
                .flat_map(|s| file[s.offset as usize..(s.offset + s.len) as usize].iter().copied())
                .collect();
            prop_assert_eq!(bytes, &want);
        }
    }
}
