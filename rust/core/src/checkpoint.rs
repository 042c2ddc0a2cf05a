//! Model directory resolution: a single `.safetensors` file, a directory with
//! `model.safetensors`, or a directory with `model.safetensors.index.json`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::header::TensorInfo;
use crate::shard::Shard;

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Where one tensor lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorRef {
    pub shard: usize,
    pub index: usize,
}

#[derive(Debug)]
pub struct Checkpoint {
    /// The path the user gave.
    pub root: PathBuf,
    /// The index file, if the checkpoint has one.
    pub index: Option<PathBuf>,
    pub shards: Vec<Shard>,
    /// Every tensor, shard by shard, in header order.
    pub tensors: Vec<TensorRef>,
    by_name: HashMap<String, usize>,
}

#[derive(Deserialize)]
struct IndexFile {
    weight_map: BTreeMap<String, String>,
}

impl Checkpoint {
    pub fn open(path: &Path) -> Result<Checkpoint> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, "opening", e))?;
        if !meta.is_dir() {
            return Self::from_shards(path, None, vec![Shard::open(path)?], None);
        }
        let index = path.join(INDEX_FILE);
        if index.is_file() {
            return Self::open_index(path, &index);
        }
        let single = path.join(SINGLE_FILE);
        if single.is_file() {
            return Self::from_shards(path, None, vec![Shard::open(&single)?], None);
        }
        Err(Error::NoCheckpoint { path: path.into() })
    }

    fn open_index(root: &Path, index: &Path) -> Result<Checkpoint> {
        let text = std::fs::read(index).map_err(|e| Error::io(index, "reading", e))?;
        let parsed: IndexFile = serde_json::from_slice(&text).map_err(|e| Error::IndexInvalid {
            path: index.into(),
            msg: e.to_string(),
        })?;
        // Shards in order of first appearance by file name, which is how they are numbered.
        let mut files: Vec<&String> = parsed.weight_map.values().collect();
        files.sort();
        files.dedup();
        let mut shards = Vec::with_capacity(files.len());
        for f in &files {
            if !is_plain_relative(f) {
                return Err(Error::UnsafeShardPath {
                    path: index.into(),
                    shard: (*f).clone(),
                });
            }
            let p = root.join(f);
            if !p.exists() {
                return Err(Error::MissingShard {
                    path: index.into(),
                    shard: (*f).clone(),
                });
            }
            check_inside(root, index, f, &p)?;
            shards.push(Shard::open(&p)?);
        }
        let wanted: Vec<(String, usize)> = parsed
            .weight_map
            .iter()
            .map(|(t, f)| (t.clone(), files.binary_search(&f).expect("file listed")))
            .collect();
        Self::from_shards(root, Some(index.to_path_buf()), shards, Some(wanted))
    }

    fn from_shards(
        root: &Path,
        index: Option<PathBuf>,
        shards: Vec<Shard>,
        wanted: Option<Vec<(String, usize)>>,
    ) -> Result<Checkpoint> {
        let mut tensors = Vec::new();
        let mut by_name = HashMap::new();
        for (si, shard) in shards.iter().enumerate() {
            for (ti, t) in shard.header.tensors.iter().enumerate() {
                if let Some(&prev) = by_name.get(&t.name) {
                    let other: &TensorRef = &tensors[prev];
                    return Err(Error::TensorInTwoShards {
                        path: shard.path.clone(),
                        tensor: t.name.clone(),
                        other: shards[other.shard].path.clone(),
                    });
                }
                by_name.insert(t.name.clone(), tensors.len());
                tensors.push(TensorRef {
                    shard: si,
                    index: ti,
                });
            }
        }
        if let Some(wanted) = wanted {
            for (name, shard) in wanted {
                let ok = by_name
                    .get(&name)
                    .map(|&i| tensors[i].shard == shard)
                    .unwrap_or(false);
                if !ok {
                    return Err(Error::TensorNotInShard {
                        path: shards[shard].path.clone(),
                        tensor: name,
                    });
                }
            }
        }
        Ok(Checkpoint {
            root: root.into(),
            index,
            shards,
            tensors,
            by_name,
        })
    }

    pub fn info(&self, r: TensorRef) -> &TensorInfo {
        &self.shards[r.shard].header.tensors[r.index]
    }

    pub fn find(&self, name: &str) -> Result<TensorRef> {
        self.by_name
            .get(name)
            .map(|&i| self.tensors[i])
            .ok_or_else(|| Error::UnknownTensor {
                path: self.root.clone(),
                tensor: name.into(),
            })
    }

    /// Absolute file offset of a tensor's first byte.
    pub fn file_offset(&self, r: TensorRef) -> u64 {
        self.shards[r.shard].header.data_start + self.info(r).begin
    }

    pub fn total_bytes(&self) -> u64 {
        self.tensors.iter().map(|&r| self.info(r).nbytes()).sum()
    }

    /// The share of the shards' bytes in the page cache, estimated from `samples` pages of
    /// each shard ([`Shard::cached_fraction`]) and weighted by shard size; None where a
    /// shard cannot say.
    pub fn cached_fraction(&self, samples: u64) -> Option<f64> {
        let total: u64 = self.shards.iter().map(|s| s.size).sum();
        if total == 0 {
            return None;
        }
        let mut sum = 0.0;
        for s in &self.shards {
            sum += s.cached_fraction(samples)? * s.size as f64;
        }
        Some(sum / total as f64)
    }
}

/// Refuses shard `name` (at `p`) if it resolves, through symlinks, outside the model
/// directory `root`: an index must not make us read (or convert, and publish) files from
/// elsewhere. The one exception is the Hugging Face cache layout, where
/// `<repo>/snapshots/<rev>/<file>` links to `<repo>/blobs/<hash>` of the same cached repo.
fn check_inside(root: &Path, index: &Path, name: &str, p: &Path) -> Result<()> {
    let root_c = root
        .canonicalize()
        .map_err(|e| Error::io(root, "resolving", e))?;
    let target = p.canonicalize().map_err(|e| Error::io(p, "resolving", e))?;
    if target.starts_with(&root_c) {
        return Ok(());
    }
    if let Some(blobs) = hf_cache_blobs(&root_c) {
        if target.parent() == Some(blobs.as_path()) {
            return Ok(());
        }
    }
    Err(Error::ShardOutsideModel {
        path: index.into(),
        shard: name.into(),
        target,
    })
}

/// `<repo>/blobs` (resolved) if `root` (resolved) lies in `<repo>/snapshots/<rev>`.
pub fn hf_cache_blobs(root: &Path) -> Option<PathBuf> {
    root.ancestors().find_map(|rev| {
        let snapshots = rev.parent()?;
        if snapshots.file_name()? != "snapshots" {
            return None;
        }
        snapshots.parent()?.join("blobs").canonicalize().ok()
    })
}

/// True for `a/b.safetensors`-like names: relative, no `..`, no root or prefix.
fn is_plain_relative(name: &str) -> bool {
    let p = Path::new(name);
    !name.is_empty()
        && p.components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_relative_paths() {
        assert!(is_plain_relative("model-00001-of-00002.safetensors"));
        assert!(is_plain_relative("sub/x.safetensors"));
        assert!(!is_plain_relative("../x.safetensors"));
        assert!(!is_plain_relative("a/../../x"));
        assert!(!is_plain_relative("/etc/passwd"));
        assert!(!is_plain_relative(""));
    }
}
