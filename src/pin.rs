//! Pins: subtrees a person asked to keep on this device (`meshfs pin`).
//! Their files are fetched now and never evicted; the list is kept in
//! `DATA_DIR/pins.json` (written atomically) by resource, so that a pin
//! follows its directory through renames. The replication task does the
//! fetching and honours pins when it evicts (`replicate.rs`); this module
//! owns the list and what a pin covers.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::ids::{ChunkHash, ResourceId};
use crate::meta::MetaState;
use crate::storage::ChunkStore;

pub const PINS_FILE: &str = "pins.json";

/// One pinned subtree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    pub resource: ResourceId,
    /// Its path under the mount when it was pinned (shown; the pin follows
    /// the resource).
    pub path: String,
    /// When it was pinned, Unix seconds.
    pub since: i64,
}

/// How much of a pinned subtree is here.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Progress {
    pub files: u64,
    /// Bytes of the distinct chunks its files' current versions need...
    pub bytes_total: u64,
    /// ...and of those already on this device.
    pub bytes_here: u64,
}

impl Progress {
    pub fn complete(&self) -> bool {
        self.bytes_here >= self.bytes_total
    }
}

/// The pin list of a device.
#[derive(Debug)]
pub struct Pins {
    path: PathBuf,
    list: Mutex<Vec<Pin>>,
}

impl Pins {
    /// Loads `DATA_DIR/pins.json` (none yet: no pins).
    pub fn load(data_dir: &Path) -> Result<Self, String> {
        let path = data_dir.join(PINS_FILE);
        let list = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| format!("{}: not a pin list: {e}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(format!("reading {}: {e}", path.display())),
        };
        Ok(Pins {
            path,
            list: Mutex::new(list),
        })
    }

    pub fn list(&self) -> Vec<Pin> {
        crate::lock(&self.list).clone()
    }

    /// Adds a pin (false: that resource was pinned already). Saved before
    /// it returns.
    pub fn add(&self, pin: Pin) -> Result<bool, String> {
        let mut l = crate::lock(&self.list);
        if l.iter().any(|p| p.resource == pin.resource) {
            return Ok(false);
        }
        l.push(pin);
        self.save(&l)?;
        Ok(true)
    }

    /// Removes the pin of `resource`, if any. Saved before it returns.
    pub fn remove(&self, resource: ResourceId) -> Result<Option<Pin>, String> {
        let mut l = crate::lock(&self.list);
        let Some(at) = l.iter().position(|p| p.resource == resource) else {
            return Ok(None);
        };
        let pin = l.remove(at);
        self.save(&l)?;
        Ok(Some(pin))
    }

    fn save(&self, l: &[Pin]) -> Result<(), String> {
        let json = serde_json::to_vec_pretty(l).map_err(|e| e.to_string())?;
        crate::datadir::write_atomic(&self.path, &json)
            .map_err(|e| format!("writing {}: {e}", self.path.display()))
    }

    /// Every file some pin covers.
    pub fn files(&self, meta: &MetaState) -> HashSet<ResourceId> {
        let roots: Vec<ResourceId> = crate::lock(&self.list).iter().map(|p| p.resource).collect();
        roots
            .into_iter()
            .flat_map(|r| meta.subtree_files(r))
            .collect()
    }
}

/// The distinct chunks (hash, length) of the current versions of `files`.
pub fn chunks_of(meta: &MetaState, files: &[ResourceId]) -> Vec<(ChunkHash, u64)> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for f in files {
        let Some(c) = meta.get(*f).and_then(|i| i.content.as_ref()) else {
            continue;
        };
        for r in c.stored_chunks() {
            if seen.insert(r.hash) {
                out.push((r.hash, u64::from(r.len)));
            }
        }
    }
    out
}

/// How much of the subtree at `root` is here.
pub fn progress(meta: &MetaState, store: &dyn ChunkStore, root: ResourceId) -> Progress {
    let files = meta.subtree_files(root);
    let chunks = chunks_of(meta, &files);
    let mut p = Progress {
        files: files.len() as u64,
        ..Progress::default()
    };
    for (h, len) in chunks {
        p.bytes_total += len;
        if store.contains(&h).unwrap_or(false) {
            p.bytes_here += len;
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pin(r: u64, path: &str) -> Pin {
        Pin {
            resource: ResourceId(r),
            path: path.into(),
            since: 0,
        }
    }

    #[test]
    fn pins_are_kept_across_loads_once_each() {
        let d = tempfile::tempdir().unwrap();
        let p = Pins::load(d.path()).unwrap();
        assert!(p.list().is_empty());
        assert!(p.add(pin(5, "/photos")).unwrap());
        assert!(!p.add(pin(5, "/photos-again")).unwrap());
        assert!(p.add(pin(9, "/music")).unwrap());
        let again = Pins::load(d.path()).unwrap();
        assert_eq!(again.list(), vec![pin(5, "/photos"), pin(9, "/music")]);
        assert_eq!(
            again.remove(ResourceId(5)).unwrap(),
            Some(pin(5, "/photos"))
        );
        assert_eq!(again.remove(ResourceId(5)).unwrap(), None);
        assert_eq!(Pins::load(d.path()).unwrap().list(), vec![pin(9, "/music")]);
        std::fs::write(d.path().join(PINS_FILE), b"{not json").unwrap();
        let e = Pins::load(d.path()).unwrap_err();
        assert!(e.contains("pins.json"), "{e}");
    }
}
