//! fastfp8-core: validated safetensors reading, fast and within a memory budget.
//!
//! No Python here: the bindings live in `rust/python`.
//! - [`header`]: parse and validate one shard's header.
//! - [`checkpoint`]: resolve a file or model directory (with or without an index) into shards.
//! - [`plan`]: the byte ranges to read.
//! - [`reader`]: native threads copy them into a caller-owned buffer, within its size.
//! - [`quant`]: FP8 quantization of rows, on the way ([`reader`]); [`amax`]: the rows'
//!   amax read ahead (tensor-parallel row slices, whose amax is all-reduced first).

pub mod amax;
pub mod checkpoint;
pub mod dtype;
pub mod error;
pub mod header;
pub mod plan;
pub mod quant;
pub mod reader;
pub mod ring;
pub mod shard;
pub mod sigbus;

pub use checkpoint::{Checkpoint, TensorRef};
pub use dtype::Dtype;
pub use error::{Error, ErrorKind, Result};
pub use header::{Header, TensorInfo};
pub use plan::{ReadItem, Segment};
pub use reader::{ChunkTimes, Delivery, DestBuffer, Next, Reader, ReaderConfig, Stats};
pub use shard::{ReadMethod, Shard};
