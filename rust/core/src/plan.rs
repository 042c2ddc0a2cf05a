//! Read plans: what to read (byte ranges of shards) and in which order.

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::quant::QuantSpec;

/// A contiguous byte range of one shard, at an absolute file offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub shard: usize,
    pub offset: u64,
    pub len: u64,
}

/// One unit the consumer receives: the concatenation of its segments.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadItem {
    /// The tensor's name, for errors and for the consumer.
    pub name: String,
    pub segments: Vec<Segment>,
    /// Quantize the rows on the way: the consumer receives e4m3 bytes and scales
    /// (see [`crate::reader::Delivery`]). Every segment must hold whole rows.
    pub quant: Option<QuantSpec>,
    /// With `quant`: a given amax per row (a row-parallel slice's, all-reduced over the
    /// ranks): each row's scale comes from the larger of it and the row's own amax (see
    /// [`crate::quant::quantize_rows_with_amax`]). One value per row, not negative.
    pub amax: Option<Vec<f32>>,
    /// With `quant`: the reader may read the item plain instead, deciding as it reaches the
    /// item (when its threads' idle time waiting for room covers the cost, else not: see
    /// [`crate::reader::Reader::quantized`]).
    pub optional: bool,
    /// Without `quant`: the item's chunks go out spread evenly between the other items'
    /// chunks, not at its place in the plan (large tensors copied as they are, such as
    /// embeddings, cross the bus while the threads quantize the weights instead of holding
    /// the ring while they do); see [`crate::reader::Reader::next`]. Ignored with a read-ahead
    /// window, which follows the plan's order.
    pub background: bool,
}

impl ReadItem {
    pub fn len(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The whole of tensor `name`.
pub fn whole_tensor(ckpt: &Checkpoint, name: &str) -> Result<ReadItem> {
    let r = ckpt.find(name)?;
    let info = ckpt.info(r);
    Ok(ReadItem {
        name: name.into(),
        segments: vec![Segment {
            shard: r.shard,
            offset: ckpt.file_offset(r),
            len: info.nbytes(),
        }],
        quant: None,
        amax: None,
        optional: false,
        background: false,
    })
}

/// Rows `[start, stop)` of the first dimension of tensor `name`: one contiguous range.
pub fn row_range(ckpt: &Checkpoint, name: &str, start: u64, stop: u64) -> Result<ReadItem> {
    let r = ckpt.find(name)?;
    let info = ckpt.info(r);
    let rows = *info.shape.first().ok_or_else(|| {
        Error::Invalid(format!("tensor {name:?} is 0-d: it has no rows to slice"))
    })?;
    if start > stop || stop > rows {
        return Err(Error::Invalid(format!(
            "rows [{start}, {stop}) out of range for tensor {name:?} with {rows} rows"
        )));
    }
    let row_bytes = info.nbytes().checked_div(rows).unwrap_or(0);
    Ok(ReadItem {
        name: name.into(),
        segments: vec![Segment {
            shard: r.shard,
            offset: ckpt.file_offset(r) + start * row_bytes,
            len: (stop - start) * row_bytes,
        }],
        quant: None,
        amax: None,
        optional: false,
        background: false,
    })
}

/// Checks every segment against its shard's data section, and the given amax of an item
/// against its rows.
pub fn validate(ckpt: &Checkpoint, items: &[ReadItem]) -> Result<()> {
    for item in items {
        validate_amax(item)?;
        if item.background && (item.quant.is_some() || item.optional) {
            return Err(Error::Invalid(format!(
                "{}: only an item read as it is may go out in the background",
                item.name
            )));
        }
        if item.optional && (item.quant.is_none() || item.amax.is_some()) {
            return Err(Error::Invalid(format!(
                "{}: only an item quantized on the way, with no given row amax, may be optional",
                item.name
            )));
        }
        for s in &item.segments {
            let shard = ckpt.shards.get(s.shard).ok_or_else(|| {
                Error::Invalid(format!(
                    "{}: shard index {} out of range",
                    item.name, s.shard
                ))
            })?;
            let end = s.offset.checked_add(s.len);
            if s.offset < shard.header.data_start || end.is_none_or(|e| e > shard.size) {
                return Err(Error::Invalid(format!(
                    "{}: range [{}, +{}) is outside the data section of {}",
                    item.name,
                    s.offset,
                    s.len,
                    shard.path.display()
                )));
            }
            if let Some(q) = item.quant {
                if s.len % q.row_bytes() != 0 {
                    return Err(Error::Invalid(format!(
                        "{}: a range of {} bytes is not whole rows of {} bytes: it cannot be quantized on the way",
                        item.name,
                        s.len,
                        q.row_bytes()
                    )));
                }
            }
        }
    }
    Ok(())
}

/// A given amax: only with `quant`, one per row, none negative.
fn validate_amax(item: &ReadItem) -> Result<()> {
    let Some(amax) = &item.amax else {
        return Ok(());
    };
    let Some(q) = item.quant else {
        return Err(Error::Invalid(format!(
            "{}: a given row amax needs a quantization spec",
            item.name
        )));
    };
    let rows = item.len() / q.row_bytes();
    if amax.len() as u64 != rows {
        return Err(Error::Invalid(format!(
            "{}: {} given row amax values for {rows} rows",
            item.name,
            amax.len()
        )));
    }
    if let Some(i) = amax.iter().position(|&a| a < 0.0) {
        return Err(Error::Invalid(format!(
            "{}: the given amax of row {i} is negative ({})",
            item.name, amax[i]
        )));
    }
    Ok(())
}
