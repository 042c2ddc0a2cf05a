//! The core's one error type. Every variant names the file and, where there is one, the
//! tensor, so that the bindings can turn it into a Python exception once, unchanged.

use std::path::PathBuf;

/// Which Python-facing family an error belongs to (the bindings map each to one class).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A safetensors header that breaks the format's rules.
    Header,
    /// A model directory or index that cannot be resolved into shards.
    Checkpoint,
    /// A read that failed or came back short (a file truncated or rewritten under us).
    Read,
    /// A request that cannot be served within the memory budget.
    Budget,
    /// Not found on disk.
    NotFound,
    /// The consumer cancelled the stream.
    Cancelled,
    /// A caller's argument is invalid (out of range, wrong size).
    Invalid,
    /// A release of something that is not a delivered, unreleased chunk.
    Release,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // --- header: one variant per rule a safetensors reader must enforce ---
    #[error("{path}: file is {size} bytes, too short for the 8-byte header length")]
    FileTooShort { path: PathBuf, size: u64 },
    #[error("{path}: header length {len} exceeds the limit of {limit} bytes")]
    HeaderTooLarge { path: PathBuf, len: u64, limit: u64 },
    #[error("{path}: header of {len} bytes runs past the end of the {size}-byte file")]
    HeaderBeyondFile { path: PathBuf, len: u64, size: u64 },
    #[error("{path}: header is not valid UTF-8")]
    HeaderNotUtf8 { path: PathBuf },
    #[error("{path}: header is not a valid JSON object: {msg}")]
    HeaderJson { path: PathBuf, msg: String },
    #[error("{path}: tensor {tensor:?} appears twice in the header")]
    DuplicateTensor { path: PathBuf, tensor: String },
    #[error("{path}: tensor {tensor:?} has unknown dtype {dtype:?}")]
    UnknownDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error("{path}: tensor {tensor:?}: shape {shape:?} overflows: a dimension, or the product of the nonzero dimensions, exceeds 2^63-1 (torch's limit), or the byte size exceeds 2^64-1")]
    ShapeOverflow {
        path: PathBuf,
        tensor: String,
        shape: Vec<u64>,
    },
    #[error("{path}: tensor {tensor:?}: data_offsets [{begin}, {end}) end before they begin")]
    OffsetsReversed {
        path: PathBuf,
        tensor: String,
        begin: u64,
        end: u64,
    },
    #[error("{path}: tensor {tensor:?}: {actual} bytes in data_offsets, but dtype and shape need {expected}")]
    SizeMismatch {
        path: PathBuf,
        tensor: String,
        expected: u64,
        actual: u64,
    },
    #[error("{path}: tensor {tensor:?} starts at data byte {begin}, leaving a gap after byte {expected}")]
    DataGap {
        path: PathBuf,
        tensor: String,
        begin: u64,
        expected: u64,
    },
    #[error("{path}: tensor {tensor:?} at data byte {begin} overlaps the previous tensor, which ends at {prev_end}")]
    DataOverlap {
        path: PathBuf,
        tensor: String,
        begin: u64,
        prev_end: u64,
    },
    #[error("{path}: tensor {tensor:?} ends at data byte {end}, but the file holds only {data_len} data bytes (truncated?)")]
    DataTruncated {
        path: PathBuf,
        tensor: String,
        end: u64,
        data_len: u64,
    },
    #[error("{path}: {extra} unused bytes after the last tensor")]
    TrailingBytes { path: PathBuf, extra: u64 },

    // --- checkpoint resolution ---
    #[error("{path}: no such file or directory")]
    NotFound { path: PathBuf },
    #[error("{path}: not a regular file")]
    NotAFile { path: PathBuf },
    #[error("{path}: not a safetensors checkpoint (no model.safetensors or model.safetensors.index.json)")]
    NoCheckpoint { path: PathBuf },
    #[error("{path}: invalid index: {msg}")]
    IndexInvalid { path: PathBuf, msg: String },
    #[error("{path}: index names shard {shard:?}, which is not a plain relative path inside the model directory")]
    UnsafeShardPath { path: PathBuf, shard: String },
    #[error("{path}: shard {shard:?} resolves to {target}, outside the model directory (symlinks may leave it only in a Hugging Face cache snapshot, into that repository's blobs/)")]
    ShardOutsideModel {
        path: PathBuf,
        shard: String,
        target: PathBuf,
    },
    #[error("{path}: shard {shard:?} listed in the index does not exist")]
    MissingShard { path: PathBuf, shard: String },
    #[error("{path}: tensor {tensor:?} is listed in the index but absent from this shard")]
    TensorNotInShard { path: PathBuf, tensor: String },
    #[error("{path}: tensor {tensor:?} is also stored in {other}")]
    TensorInTwoShards {
        path: PathBuf,
        tensor: String,
        other: PathBuf,
    },
    #[error("{path}: no tensor named {tensor:?}")]
    UnknownTensor { path: PathBuf, tensor: String },

    // --- reading ---
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: tensor {tensor:?}: file ended at byte {at} while reading (it was {expected_size} bytes when opened: truncated or rewritten during the load?)")]
    ShortRead {
        path: PathBuf,
        tensor: String,
        at: u64,
        expected_size: u64,
    },
    #[error("{path}: file changed size from {expected} to {actual} bytes after it was opened")]
    FileChanged {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    /// A copy out of the mapping faulted (SIGBUS, caught).
    #[error("{path}: tensor {tensor:?}: reading the mapped file from byte {at} failed: {}", mapped_cause(*.expected_size, *.actual_size))]
    MappedReadFailed {
        path: PathBuf,
        tensor: String,
        at: u64,
        expected_size: u64,
        actual_size: u64,
    },

    // --- budget and arguments ---
    #[error("{path}: tensor {tensor:?} needs {needed} bytes, more than the memory budget of {budget} bytes")]
    TensorOverBudget {
        path: PathBuf,
        tensor: String,
        needed: u64,
        budget: u64,
    },
    #[error("memory budget exhausted: {held} bytes are held by the consumer and the next read of tensor {tensor:?} needs {needed}; release slots before asking for more (budget {budget})")]
    BudgetExhausted {
        tensor: String,
        held: u64,
        needed: u64,
        budget: u64,
    },
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("cannot release {len} bytes at buffer offset {buf_offset}: {why}")]
    InvalidRelease {
        buf_offset: u64,
        len: u64,
        why: String,
    },
    #[error("the stream was cancelled")]
    Cancelled,
}

impl ErrorKind {
    /// Every kind, for the bindings' exhaustive mapping test.
    pub const ALL: [ErrorKind; 8] = [
        ErrorKind::Header,
        ErrorKind::Checkpoint,
        ErrorKind::Read,
        ErrorKind::Budget,
        ErrorKind::NotFound,
        ErrorKind::Cancelled,
        ErrorKind::Invalid,
        ErrorKind::Release,
    ];

    /// The kind's name (as in the source).
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Header => "Header",
            ErrorKind::Checkpoint => "Checkpoint",
            ErrorKind::Read => "Read",
            ErrorKind::Budget => "Budget",
            ErrorKind::NotFound => "NotFound",
            ErrorKind::Cancelled => "Cancelled",
            ErrorKind::Invalid => "Invalid",
            ErrorKind::Release => "Release",
        }
    }
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        use Error::*;
        match self {
            FileTooShort { .. }
            | HeaderTooLarge { .. }
            | HeaderBeyondFile { .. }
            | HeaderNotUtf8 { .. }
            | HeaderJson { .. }
            | DuplicateTensor { .. }
            | UnknownDtype { .. }
            | ShapeOverflow { .. }
            | OffsetsReversed { .. }
            | SizeMismatch { .. }
            | DataGap { .. }
            | DataOverlap { .. }
            | DataTruncated { .. }
            | TrailingBytes { .. } => ErrorKind::Header,
            NotFound { .. } => ErrorKind::NotFound,
            NotAFile { .. } => ErrorKind::Checkpoint,
            NoCheckpoint { .. }
            | IndexInvalid { .. }
            | UnsafeShardPath { .. }
            | ShardOutsideModel { .. }
            | MissingShard { .. }
            | TensorNotInShard { .. }
            | TensorInTwoShards { .. }
            | UnknownTensor { .. } => ErrorKind::Checkpoint,
            Io { .. } | ShortRead { .. } | FileChanged { .. } | MappedReadFailed { .. } => {
                ErrorKind::Read
            }
            TensorOverBudget { .. } | BudgetExhausted { .. } => ErrorKind::Budget,
            Invalid(_) => ErrorKind::Invalid,
            InvalidRelease { .. } => ErrorKind::Release,
            Cancelled => ErrorKind::Cancelled,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            return Error::NotFound { path };
        }
        Error::Io { path, op, source }
    }
}

/// Why a copy out of a mapping faults: the file shrank, or, at an unchanged size, the disk
/// failed to page it in (or the file was rewritten in place).
fn mapped_cause(expected: u64, actual: u64) -> String {
    if actual != expected {
        format!("the file changed size from {expected} to {actual} bytes after it was opened")
    } else {
        format!(
            "the file is still {actual} bytes, so the disk could not read it back (an I/O error) \
             or it was rewritten in place; method=\"pread\" reports the disk's own error"
        )
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    fn mapped(expected_size: u64, actual_size: u64) -> String {
        Error::MappedReadFailed {
            path: "m/x.safetensors".into(),
            tensor: "w".into(),
            at: 4096,
            expected_size,
            actual_size,
        }
        .to_string()
    }

    #[test]
    fn a_failed_mapped_read_names_file_tensor_and_cause() {
        let shrunk = mapped(10_000, 3_000);
        assert!(shrunk
            .starts_with("m/x.safetensors: tensor \"w\": reading the mapped file from byte 4096"));
        assert!(
            shrunk.contains("changed size from 10000 to 3000 bytes"),
            "{shrunk}"
        );
        let same = mapped(10_000, 10_000);
        assert!(
            same.contains("I/O error") && same.contains("pread"),
            "{same}"
        );
        assert!(!same.contains("changed size"), "{same}");
        let err = Error::MappedReadFailed {
            path: "p".into(),
            tensor: "t".into(),
            at: 0,
            expected_size: 1,
            actual_size: 1,
        };
        assert_eq!(err.kind(), ErrorKind::Read);
    }
}
