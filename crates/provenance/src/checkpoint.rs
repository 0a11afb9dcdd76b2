//! Which weights made an image: the hub repository and revision of a pulled model, or a digest of a
//! model directory's files.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// The identity of a checkpoint, as a manifest names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checkpoint {
    /// A snapshot of a hub repository (`models--OWNER--NAME/snapshots/COMMIT`, the hub cache's layout
    /// that `imagegate models pull` writes).
    Hub { repo: String, revision: String },
    /// Any other directory: [`digest`] of its files.
    Digest { sha256: String },
}

impl Checkpoint {
    /// The hub snapshot `dir` is, or else the digest of its files (reads every file: seconds per
    /// gigabyte; run it off any request's path).
    pub fn identify(dir: &Path) -> std::io::Result<Checkpoint> {
        match hub_snapshot(dir) {
            Some(hub) => Ok(hub),
            None => Ok(Checkpoint::Digest { sha256: digest(dir)? }),
        }
    }

    /// [`Checkpoint::identify`], with digests remembered in `cache_dir` ([`DIGEST_CACHE`]): a
    /// directory whose files have the same paths, sizes and modification times as when it was last
    /// hashed keeps its digest without being read again (the check is a `stat` per file).
    pub fn identify_cached(dir: &Path, cache_dir: &Path) -> std::io::Result<Checkpoint> {
        if let Some(hub) = hub_snapshot(dir) {
            return Ok(hub);
        }
        let files = listing(dir)?;
        let stamp: Vec<Value> = files.iter().map(|(rel, size, mtime)| json!([rel, size, mtime])).collect();
        let key = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf()).to_string_lossy().into_owned();
        let cache = cache_dir.join(DIGEST_CACHE);
        let known: serde_json::Map<String, Value> =
            std::fs::read(&cache).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        if let Some(entry) = known.get(&key)
            && entry.get("files") == Some(&Value::Array(stamp.clone()))
            && let Some(sha256) = entry.get("sha256").and_then(Value::as_str)
        {
            return Ok(Checkpoint::Digest { sha256: sha256.to_owned() });
        }
        let sha256 = digest_of(dir, &files)?;
        // Models are identified on threads of their own: one read-modify-write of the file at a time
        // in this process, so none loses another's entry.
        static WRITING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = WRITING.lock().unwrap_or_else(|e| e.into_inner());
        let mut known: serde_json::Map<String, Value> =
            std::fs::read(&cache).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        known.insert(key, json!({ "files": stamp, "sha256": sha256 }));
        // Best effort: a cache that cannot be written only costs the next start a reread.
        if std::fs::create_dir_all(cache_dir).is_ok() {
            let aside = cache.with_extension(format!("json.{}", std::process::id()));
            if std::fs::write(&aside, Value::Object(known).to_string()).is_ok() {
                let _ = std::fs::rename(&aside, &cache);
            }
        }
        Ok(Checkpoint::Digest { sha256 })
    }

    pub fn to_json(&self) -> Value {
        match self {
            Checkpoint::Hub { repo, revision } => json!({ "hub_repo": repo, "revision": revision }),
            Checkpoint::Digest { sha256 } => json!({ "files_sha256": sha256 }),
        }
    }
}

impl std::fmt::Display for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Checkpoint::Hub { repo, revision } => write!(f, "{repo}@{revision}"),
            Checkpoint::Digest { sha256 } => write!(f, "files sha256:{sha256}"),
        }
    }
}

/// The file in a cache dir that remembers directories' digests ([`Checkpoint::identify_cached`]).
pub const DIGEST_CACHE: &str = "checkpoint-digests.json";

/// `.../models--OWNER--NAME/snapshots/COMMIT` as the hub repository and commit it holds.
fn hub_snapshot(dir: &Path) -> Option<Checkpoint> {
    let dir = dir.canonicalize().ok().unwrap_or_else(|| dir.to_path_buf());
    let revision = dir.file_name()?.to_str()?.to_owned();
    let snapshots = dir.parent()?;
    if snapshots.file_name()? != "snapshots" {
        return None;
    }
    let repo = snapshots.parent()?.file_name()?.to_str()?.strip_prefix("models--")?.replace("--", "/");
    let well_formed = revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit());
    (well_formed && repo.contains('/')).then_some(Checkpoint::Hub { repo, revision })
}

/// SHA-256 over every regular file under `dir` (links followed, hidden entries skipped), in the order
/// of their paths relative to `dir`: for each, the path, a NUL, the file's own SHA-256 in hex and a
/// newline. Renaming, adding or changing any file changes it.
pub fn digest(dir: &Path) -> std::io::Result<String> {
    digest_of(dir, &listing(dir)?)
}

/// Every regular file under `dir` as (path relative to it with `/` separators, size, modification
/// time in nanoseconds since the epoch), in path order.
fn listing(dir: &Path) -> std::io::Result<Vec<(String, u64, u128)>> {
    let mut files = Vec::new();
    walk(dir, Path::new(""), &mut files)?;
    let mut out = Vec::with_capacity(files.len());
    for rel in files {
        let meta = std::fs::metadata(dir.join(&rel))?;
        let mtime = meta.modified()?.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        out.push((rel.to_string_lossy().replace('\\', "/"), meta.len(), mtime));
    }
    out.sort();
    Ok(out)
}

fn digest_of(dir: &Path, files: &[(String, u64, u128)]) -> std::io::Result<String> {
    let mut all = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for (rel, _, _) in files {
        let mut file = std::fs::File::open(dir.join(rel))?;
        let mut one = Sha256::new();
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            one.update(&buf[..n]);
        }
        all.update(rel.as_bytes());
        all.update([0]);
        all.update(format!("{:x}", one.finalize()).as_bytes());
        all.update(b"\n");
    }
    Ok(format!("{:x}", all.finalize()))
}

fn walk(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(root.join(rel))? {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let path = rel.join(&name);
        // Follows links: a hub snapshot's files are links into its blobs.
        let meta = std::fs::metadata(root.join(&path))?;
        if meta.is_dir() {
            walk(root, &path, out)?;
        } else if meta.is_file() {
            out.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hub_snapshot_is_named_by_repo_and_commit() {
        let tmp = tempfile::tempdir().unwrap();
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let snap = tmp.path().join("models--stabilityai--sd-turbo").join("snapshots").join(commit);
        std::fs::create_dir_all(&snap).unwrap();
        assert_eq!(
            Checkpoint::identify(&snap).unwrap(),
            Checkpoint::Hub { repo: "stabilityai/sd-turbo".into(), revision: commit.into() }
        );
        // Not a commit: a digest.
        let other = tmp.path().join("models--a--b").join("snapshots").join("main");
        std::fs::create_dir_all(&other).unwrap();
        assert!(matches!(Checkpoint::identify(&other).unwrap(), Checkpoint::Digest { .. }));
    }

    #[test]
    fn a_cached_digest_is_kept_until_a_file_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let (model, cache) = (tmp.path().join("model"), tmp.path().join("cache"));
        std::fs::create_dir_all(&model).unwrap();
        std::fs::write(model.join("w.safetensors"), [1u8, 2, 3]).unwrap();
        let first = Checkpoint::identify_cached(&model, &cache).unwrap();
        assert_eq!(first, Checkpoint::Digest { sha256: digest(&model).unwrap() });
        assert!(cache.join(DIGEST_CACHE).is_file());
        // The remembered digest is what is returned while the files look the same: tamper with the
        // cache entry to see it used.
        let text = std::fs::read_to_string(cache.join(DIGEST_CACHE)).unwrap();
        let Checkpoint::Digest { sha256 } = &first else { unreachable!() };
        std::fs::write(cache.join(DIGEST_CACHE), text.replace(sha256.as_str(), &"a".repeat(64))).unwrap();
        assert_eq!(Checkpoint::identify_cached(&model, &cache).unwrap(), Checkpoint::Digest { sha256: "a".repeat(64) });
        // A file of another size: hashed again.
        std::fs::write(model.join("w.safetensors"), [1u8, 2, 3, 4]).unwrap();
        let again = Checkpoint::identify_cached(&model, &cache).unwrap();
        assert_eq!(again, Checkpoint::Digest { sha256: digest(&model).unwrap() });
        assert_ne!(again, first);
    }

    #[test]
    fn the_digest_changes_with_any_file_and_only_then() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        std::fs::create_dir_all(d.join("unet")).unwrap();
        std::fs::write(d.join("model_index.json"), "{}").unwrap();
        std::fs::write(d.join("unet/w.safetensors"), [1u8, 2, 3]).unwrap();
        std::fs::write(d.join(".hidden"), "x").unwrap();
        let first = digest(d).unwrap();
        assert_eq!(first.len(), 64);
        assert_eq!(digest(d).unwrap(), first);
        std::fs::write(d.join(".hidden"), "y").unwrap();
        assert_eq!(digest(d).unwrap(), first, "hidden files are not the model");
        std::fs::write(d.join("unet/w.safetensors"), [1u8, 2, 4]).unwrap();
        let changed = digest(d).unwrap();
        assert_ne!(changed, first);
        std::fs::rename(d.join("unet/w.safetensors"), d.join("unet/v.safetensors")).unwrap();
        assert_ne!(digest(d).unwrap(), changed, "a renamed file is another model");
    }
}
