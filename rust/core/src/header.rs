//! safetensors header parsing and validation.
//!
//! Layout: an 8-byte little-endian header length N, N bytes of UTF-8 JSON (an object,
//! possibly space-padded), then the data section. Each tensor entry is
//! `{dtype, shape, data_offsets: [begin, end)}` relative to the data section; an optional
//! `__metadata__` entry maps strings to strings. Sorted by offset, the tensors must tile the
//! data section exactly. Nothing is allocated from a length in the file before that length
//! has been checked against the file's size and the header limit.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::de::{self, DeserializeSeed, MapAccess, Visitor};
use serde::Deserialize;

use crate::dtype::Dtype;
use crate::error::{Error, Result};

/// The largest header accepted, as in the safetensors library.
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// One tensor of a shard. Offsets are relative to the start of the data section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    pub begin: u64,
    pub end: u64,
}

impl TensorInfo {
    pub fn nbytes(&self) -> u64 {
        self.end - self.begin
    }
}

/// A validated header.
#[derive(Debug, Clone)]
pub struct Header {
    /// Absolute file offset of the data section (8 + N).
    pub data_start: u64,
    /// Tensors in the order the header lists them.
    pub tensors: Vec<TensorInfo>,
    pub metadata: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
struct RawTensor {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

enum RawEntry {
    Metadata(Option<BTreeMap<String, String>>),
    Tensor(String, RawTensor),
}

/// Collects the top-level object in order, rejecting duplicate keys (serde_json's own map
/// types would keep the last one silently).
struct Entries(Vec<RawEntry>);

struct EntriesVisitor;

impl<'de> Visitor<'de> for EntriesVisitor {
    type Value = Entries;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object of tensor entries")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(de::Error::custom(format_args!("\u{0}duplicate\u{0}{key}")));
            }
            if key == "__metadata__" {
                out.push(RawEntry::Metadata(map.next_value()?));
            } else {
                let t: RawTensor = map
                    .next_value()
                    .map_err(|e| de::Error::custom(format_args!("tensor {key:?}: {e}")))?;
                out.push(RawEntry::Tensor(key, t));
            }
        }
        Ok(Entries(out))
    }
}

impl<'de> DeserializeSeed<'de> for EntriesVisitor {
    type Value = Entries;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Entries, D::Error> {
        d.deserialize_map(self)
    }
}

/// Reads and validates the header of `file` (of `file_size` bytes) named `path`.
pub fn read_header(path: &Path, file: &File, file_size: u64) -> Result<Header> {
    if file_size < 8 {
        return Err(Error::FileTooShort {
            path: path.into(),
            size: file_size,
        });
    }
    let mut len = [0u8; 8];
    file.read_exact_at(&mut len, 0)
        .map_err(|e| Error::io(path, "reading header length", e))?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER_LEN {
        return Err(Error::HeaderTooLarge {
            path: path.into(),
            len: n,
            limit: MAX_HEADER_LEN,
        });
    }
    if n > file_size - 8 {
        return Err(Error::HeaderBeyondFile {
            path: path.into(),
            len: n,
            size: file_size,
        });
    }
    let mut buf = vec![0u8; n as usize];
    file.read_exact_at(&mut buf, 8)
        .map_err(|e| Error::io(path, "reading header", e))?;
    parse_header(path, &buf, file_size)
}

/// Validates the header bytes `buf` (the N bytes after the length) of a file of
/// `file_size` bytes.
pub fn parse_header(path: &Path, buf: &[u8], file_size: u64) -> Result<Header> {
    let p = || PathBuf::from(path);
    let text = std::str::from_utf8(buf).map_err(|_| Error::HeaderNotUtf8 { path: p() })?;
    let mut de = serde_json::Deserializer::from_str(text);
    let entries = EntriesVisitor
        .deserialize(&mut de)
        .and_then(|e| de.end().map(|_| e));
    let entries = match entries {
        Ok(e) => e.0,
        Err(e) => {
            let msg = e.to_string();
            if let Some(rest) = msg.strip_prefix("\u{0}duplicate\u{0}") {
                let tensor = rest.split(" at line ").next().unwrap_or(rest).to_string();
                return Err(Error::DuplicateTensor { path: p(), tensor });
            }
            return Err(Error::HeaderJson { path: p(), msg });
        }
    };

    let data_start = 8 + buf.len() as u64;
    let data_len = file_size
        .checked_sub(data_start)
        .ok_or(Error::HeaderBeyondFile {
            path: p(),
            len: buf.len() as u64,
            size: file_size,
        })?;
    let mut metadata = None;
    let mut tensors = Vec::with_capacity(entries.len());
    for entry in entries {
        let (name, raw) = match entry {
            RawEntry::Metadata(m) => {
                metadata = m;
                continue;
            }
            RawEntry::Tensor(name, raw) => (name, raw),
        };
        let dtype: Dtype = raw.dtype.parse().map_err(|_| Error::UnknownDtype {
            path: p(),
            tensor: name.clone(),
            dtype: raw.dtype.clone(),
        })?;
        let (begin, end) = raw.data_offsets;
        // torch keeps sizes as i64: every dimension, and the product of the nonzero ones
        // (what a zero-size tensor's strides multiply out to), must fit. Checked here, so
        // nothing downstream sees a size it cannot represent.
        let fits_i64 = raw
            .shape
            .iter()
            .filter(|&&d| d != 0)
            .try_fold(1u64, |acc, &d| {
                acc.checked_mul(d).filter(|&p| p <= i64::MAX as u64)
            });
        let expected = fits_i64
            .and_then(|_| {
                raw.shape
                    .iter()
                    .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            })
            .and_then(|numel| dtype.nbytes(numel))
            .ok_or_else(|| Error::ShapeOverflow {
                path: p(),
                tensor: name.clone(),
                shape: raw.shape.clone(),
            })?;
        if end < begin {
            return Err(Error::OffsetsReversed {
                path: p(),
                tensor: name,
                begin,
                end,
            });
        }
        if end - begin != expected {
            return Err(Error::SizeMismatch {
                path: p(),
                tensor: name,
                expected,
                actual: end - begin,
            });
        }
        tensors.push(TensorInfo {
            name,
            dtype,
            shape: raw.shape,
            begin,
            end,
        });
    }

    // The tensors must tile [0, data_len) exactly.
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&i| (tensors[i].begin, tensors[i].end));
    let mut cursor = 0u64;
    for &i in &order {
        let t = &tensors[i];
        if t.begin > cursor {
            return Err(Error::DataGap {
                path: p(),
                tensor: t.name.clone(),
                begin: t.begin,
                expected: cursor,
            });
        }
        if t.begin < cursor {
            return Err(Error::DataOverlap {
                path: p(),
                tensor: t.name.clone(),
                begin: t.begin,
                prev_end: cursor,
            });
        }
        if t.end > data_len {
            return Err(Error::DataTruncated {
                path: p(),
                tensor: t.name.clone(),
                end: t.end,
                data_len,
            });
        }
        cursor = t.end;
    }
    if cursor != data_len {
        return Err(Error::TrailingBytes {
            path: p(),
            extra: data_len - cursor,
        });
    }
    Ok(Header {
        data_start,
        tensors,
        metadata,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn file_bytes(header: &str, data_len: usize) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend(std::iter::repeat_n(7u8, data_len));
        v
    }

    fn parse(header: &str, data_len: usize) -> Result<Header> {
        let bytes = file_bytes(header, data_len);
        parse_header(
            Path::new("x.safetensors"),
            &bytes[8..8 + header.len()],
            bytes.len() as u64,
        )
    }

    #[test]
    fn valid_header_keeps_order_and_metadata() {
        let h = parse(
            r#"{"b":{"dtype":"BF16","shape":[2],"data_offsets":[4,8]},
                "__metadata__":{"format":"pt"},
                "a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}   "#,
            8,
        )
        .unwrap();
        assert_eq!(
            h.tensors
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>(),
            ["b", "a"]
        );
        assert_eq!(h.metadata.unwrap()["format"], "pt");
    }

    #[test]
    fn empty_and_scalar_tensors() {
        let h = parse(
            r#"{"e":{"dtype":"F32","shape":[0,3],"data_offsets":[0,0]},
                "s":{"dtype":"F64","shape":[],"data_offsets":[0,8]},
                "e2":{"dtype":"U8","shape":[0],"data_offsets":[8,8]}}"#,
            8,
        )
        .unwrap();
        assert_eq!(h.tensors.len(), 3);
    }

    fn kind_of(header: &str, data_len: usize) -> String {
        format!("{:?}", parse(header, data_len).unwrap_err())
            .split([' ', '{'])
            .next()
            .unwrap()
            .to_string()
    }

    #[test]
    fn each_rule_has_its_error() {
        let t = |d: &str, s: &str, o: &str| {
            format!(r#""t":{{"dtype":"{d}","shape":{s},"data_offsets":{o}}}"#)
        };
        assert_eq!(
            kind_of(&format!("{{{}}}", t("X9", "[1]", "[0,1]")), 1),
            "UnknownDtype"
        );
        assert_eq!(
            kind_of(&format!("{{{}}}", t("F32", "[1]", "[4,0]")), 4),
            "OffsetsReversed"
        );
        assert_eq!(
            kind_of(&format!("{{{}}}", t("F32", "[2]", "[0,4]")), 4),
            "SizeMismatch"
        );
        assert_eq!(
            kind_of(&format!("{{{}}}", t("F32", "[1]", "[4,8]")), 8),
            "DataGap"
        );
        assert_eq!(
            kind_of(&format!("{{{}}}", t("F32", "[1]", "[0,4]")), 2),
            "DataTruncated"
        );
        assert_eq!(
            kind_of(&format!("{{{}}}", t("F32", "[1]", "[0,4]")), 6),
            "TrailingBytes"
        );
        assert_eq!(
            kind_of(
                &format!("{{{}}}", t("F32", "[4294967296,4294967296,2]", "[0,4]")),
                4
            ),
            "ShapeOverflow"
        );
        assert_eq!(
            kind_of(
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},
                    "b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                8
            ),
            "DataOverlap"
        );
        assert_eq!(
            kind_of(
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},
                    "a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                8
            ),
            "DuplicateTensor"
        );
        assert_eq!(kind_of("[1,2]", 0), "HeaderJson");
        assert_eq!(kind_of(r#"{"t":{"dtype":"F32"}}"#, 0), "HeaderJson");
        assert_eq!(kind_of(r#"{"__metadata__":{"a":1}}"#, 0), "HeaderJson");
        assert_eq!(kind_of("{} trailing", 0), "HeaderJson");
        let err = parse_header(Path::new("x"), &[0xff, 0xfe], 10).unwrap_err();
        assert!(matches!(err, Error::HeaderNotUtf8 { .. }));
        assert_eq!(err.kind(), ErrorKind::Header);
    }

    #[test]
    fn duplicate_names_the_tensor() {
        let err = parse(
            r#"{"w.x":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"w.x":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#,
            2,
        )
        .unwrap_err();
        assert!(err.to_string().contains("\"w.x\""), "{err}");
    }

    proptest::proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = parse_header(Path::new("g"), &bytes, bytes.len() as u64 + 8 + 16);
        }
    }
}
