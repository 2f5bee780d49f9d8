//! Freeze requests: how a controller gets the filesystems of a group
//! snapshot's members frozen by the node plugins that have them mounted,
//! through the pool (the one thing a controller and every node share; it
//! sees none of their mounts).
//!
//! ```text
//! <pool>/freezes/<group>.json          the request (FreezeRequest), locked
//!                                      by the controller while it waits
//! <pool>/freezes/<group>@<node>.answer a node's answer (FreezeAnswer),
//!                                      locked by its freeze guardian for
//!                                      as long as the freeze holds
//! ```
//!
//! Liveness is read from the locks, never from timestamps, so a dead
//! process is seen as dead at once and clocks do not matter:
//! - a request whose lock is free is abandoned (its controller died): a
//!   node thaws what it froze for it;
//! - an answer whose lock is free names a freeze that no longer holds: the
//!   controller refuses the group rather than trust its copies.
//!
//! The guardian lets go of the answer's lock *before* it thaws, so "locked"
//! always means "still frozen".

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::io_error;
use super::{Pool, PoolError};
use crate::sys::fs as sysfs;
use crate::sys::lock::{self, LockKind};

/// The pool directory holding requests and answers.
pub const DIR: &str = "freezes";

/// The longest a guardian keeps a filesystem frozen, whatever happens to
/// the controller that asked: a bound on how long a pod's writes can stall.
pub const MAX_FREEZE: Duration = Duration::from_secs(15);

/// How long a controller waits for the nodes' answers before refusing.
pub const ANSWER_WAIT: Duration = Duration::from_secs(10);

/// A controller's copies must be done by this long after its request, so
/// that they end well before any guardian's [`MAX_FREEZE`] (a guardian
/// starts after the request, so its deadline is later than the request's
/// time plus `MAX_FREEZE`).
pub const COPY_DEADLINE: Duration = Duration::from_secs(12);

/// How old a temporary file must be before the janitor takes it for
/// debris (it is locked only after it is made).
const TEMP_GRACE: Duration = Duration::from_secs(60);

/// What a controller asks: freeze these volumes, wherever they are mounted
/// for writing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FreezeRequest {
    /// The group snapshot being made.
    pub group: String,
    /// The members attached for writing somewhere.
    pub volumes: Vec<String>,
    /// How long the freeze may last at most, in milliseconds.
    pub max_freeze_ms: u64,
}

/// What one node answers: the members it froze, and those it has attached
/// for writing but cannot freeze.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FreezeAnswer {
    /// The node.
    pub node: String,
    /// Volumes whose filesystems this node froze.
    pub frozen: Vec<String>,
    /// Volumes this node writes but could not freeze, with the reason.
    pub refused: Vec<(String, String)>,
}

/// A request posted by this process; removed (and its lock let go) when
/// dropped, which is what tells the nodes to thaw.
#[derive(Debug)]
pub struct PostedRequest {
    path: PathBuf,
    _lock: File,
    dir: PathBuf,
    group: String,
}

impl PostedRequest {
    /// The answers given so far, each with whether its freeze still holds
    /// (its guardian's lock is held). Answers being written are not seen
    /// (they appear by a rename).
    pub fn answers(&self) -> Result<Vec<(FreezeAnswer, bool)>, PoolError> {
        let prefix = format!("{}@", self.group);
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io_error("list", &self.dir))? {
            let entry = entry.map_err(io_error("list", &self.dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if !(name.starts_with(&prefix) && name.ends_with(".answer")) {
                continue;
            }
            let path = entry.path();
            let file = match OpenOptions::new().read(true).write(true).open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_error("open", &path)(e)),
            };
            let answer: FreezeAnswer =
                serde_json::from_reader(&file).map_err(|e| PoolError::Damaged {
                    path: path.clone(),
                    problem: format!("unreadable freeze answer: {e}"),
                })?;
            // Held by its guardian: the freeze holds. A shared probe never
            // keeps anything: the file closes at the end of this turn.
            let holds =
                !lock::try_lock(&file, LockKind::Shared).map_err(io_error("lock", &path))?;
            out.push((answer, holds));
        }
        Ok(out)
    }
}

impl Drop for PostedRequest {
    fn drop(&mut self) {
        // Unlink first, then let the lock go (the field drops after this):
        // a node sees either a live request or none.
        if let Err(e) = sysfs::remove_if_present(&self.path) {
            log::warn!("cannot remove {}: {e}", self.path.display());
        }
        remove_answers(&self.dir, &self.group);
    }
}

/// Removes the answers given to a group's request (the nodes remove theirs
/// too, once thawed; whoever is first wins).
fn remove_answers(dir: &Path, group: &str) {
    let prefix = format!("{group}@");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".answer"))
        {
            let _ = sysfs::remove_if_present(&entry.path());
        }
    }
}

/// A request found by a node, with whether its controller still waits.
#[derive(Debug, Clone)]
pub struct FoundRequest {
    /// The request.
    pub request: FreezeRequest,
    /// Its controller holds its lock.
    pub live: bool,
}

/// An answer being written by a node: a file locked before anything is
/// frozen, whose descriptor the guardian inherits (and with it the lock).
#[derive(Debug)]
pub struct AnswerFile {
    file: File,
    temp: PathBuf,
    path: PathBuf,
}

impl AnswerFile {
    /// The open, locked file (for the guardian to inherit).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Writes the answer and makes it visible.
    pub fn publish(mut self, answer: &FreezeAnswer) -> Result<(), PoolError> {
        let bytes = serde_json::to_vec(answer).expect("answers serialise");
        self.file
            .write_all(&bytes)
            .and_then(|()| self.file.sync_all())
            .map_err(io_error("write", &self.temp))?;
        std::fs::rename(&self.temp, &self.path).map_err(io_error("rename", &self.temp))?;
        // Dropping this process's descriptor leaves the lock to the
        // guardian's copy of it (the same open file description).
        Ok(())
    }
}

impl Drop for AnswerFile {
    fn drop(&mut self) {
        let _ = sysfs::remove_if_present(&self.temp);
    }
}

impl Pool {
    fn freeze_dir(&self) -> PathBuf {
        self.root().join(DIR)
    }

    /// Posts a request to freeze `volumes` for group `group`, replacing any
    /// left by a controller that died while making the same group.
    pub fn post_freeze(&self, group: &str, volumes: &[String]) -> Result<PostedRequest, PoolError> {
        let dir = self.freeze_dir();
        let path = dir.join(format!("{group}.json"));
        remove_answers(&dir, group);
        let request = FreezeRequest {
            group: group.to_owned(),
            volumes: volumes.to_vec(),
            max_freeze_ms: u64::try_from(MAX_FREEZE.as_millis()).unwrap_or(u64::MAX),
        };
        // Locked before it has a name: a node never sees it unlocked while
        // this process lives.
        let temp = dir.join(format!(".{group}.json.tmp"));
        sysfs::remove_if_present(&temp).map_err(io_error("remove", &temp))?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)
            .map_err(io_error("create", &temp))?;
        if !lock::try_lock(&file, LockKind::Exclusive).map_err(io_error("lock", &temp))? {
            return Err(PoolError::Busy {
                kind: "group snapshot",
                id: group.to_owned(),
            });
        }
        let bytes = serde_json::to_vec(&request).expect("requests serialise");
        file.write_all(&bytes)
            .and_then(|()| file.sync_all())
            .map_err(io_error("write", &temp))?;
        std::fs::rename(&temp, &path).map_err(io_error("rename", &temp))?;
        Ok(PostedRequest {
            path,
            _lock: file,
            dir,
            group: group.to_owned(),
        })
    }

    /// Every request in the pool, live or abandoned. Requests being written
    /// or unreadable are skipped (the next look sees them whole).
    pub fn freeze_requests(&self) -> Result<Vec<FoundRequest>, PoolError> {
        let dir = self.freeze_dir();
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io_error("list", &dir)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io_error("list", &dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with('.') || !name.ends_with(".json") {
                continue;
            }
            let path = entry.path();
            let file = match OpenOptions::new().read(true).write(true).open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_error("open", &path)(e)),
            };
            let Ok(request) = serde_json::from_reader::<_, FreezeRequest>(&file) else {
                continue;
            };
            let live = !lock::try_lock(&file, LockKind::Shared).map_err(io_error("lock", &path))?;
            out.push(FoundRequest { request, live });
        }
        Ok(out)
    }

    /// Whether the request of `group` is still there and its controller
    /// still waits.
    pub fn freeze_request_live(&self, group: &str) -> Result<bool, PoolError> {
        let path = self.freeze_dir().join(format!("{group}.json"));
        let file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_error("open", &path)(e)),
        };
        Ok(!lock::try_lock(&file, LockKind::Shared).map_err(io_error("lock", &path))?)
    }

    /// Starts `node`'s answer to `group`: a locked file not yet visible.
    pub fn begin_answer(&self, group: &str, node: &str) -> Result<AnswerFile, PoolError> {
        let dir = self.freeze_dir();
        let path = dir.join(format!("{group}@{node}.answer"));
        let temp = dir.join(format!(".{group}@{node}.answer.tmp"));
        sysfs::remove_if_present(&temp).map_err(io_error("remove", &temp))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&temp)
            .map_err(io_error("create", &temp))?;
        if !lock::try_lock(&file, LockKind::Exclusive).map_err(io_error("lock", &temp))? {
            return Err(PoolError::Busy {
                kind: "freeze answer",
                id: format!("{group}@{node}"),
            });
        }
        Ok(AnswerFile { file, temp, path })
    }

    /// Whether `node` has answered `group`'s request (in this life or an
    /// earlier one).
    pub fn has_answer(&self, group: &str, node: &str) -> bool {
        self.freeze_dir()
            .join(format!("{group}@{node}.answer"))
            .exists()
    }

    /// Removes `node`'s answer to `group` (its freeze is over).
    pub fn remove_answer(&self, group: &str, node: &str) {
        let path = self.freeze_dir().join(format!("{group}@{node}.answer"));
        if let Err(e) = sysfs::remove_if_present(&path) {
            log::warn!("cannot remove {}: {e}", path.display());
        }
    }

    /// Removes what controllers and nodes that died left here: requests
    /// whose controller is gone, answers no guardian holds whose request is
    /// gone, half-written files nobody holds. Run by the janitor; anything
    /// whose lock is held is somebody's work in progress and stays.
    pub(super) fn remove_abandoned_freezes(&self) -> Result<usize, PoolError> {
        let dir = self.freeze_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io_error("list", &dir)(e)),
        };
        let mut names: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .collect();
        // Requests first, so their answers are seen without a request.
        names.sort_by_key(|n| !n.ends_with(".json"));
        let mut removed = 0;
        for name in names {
            let path = dir.join(&name);
            let request_gone = match name.split_once('@') {
                Some((group, _)) if name.ends_with(".answer") => {
                    !dir.join(format!("{group}.json")).exists()
                }
                _ => true,
            };
            if !request_gone {
                continue;
            }
            let Ok(file) = OpenOptions::new().read(true).write(true).open(&path) else {
                continue;
            };
            let Ok(held) = file.metadata() else { continue };
            // A temporary file is made before it is locked: one younger
            // than a minute may be a post or an answer under way.
            let young = held
                .modified()
                .ok()
                .and_then(|m| m.elapsed().ok())
                .is_none_or(|age| age < TEMP_GRACE);
            if name.starts_with('.') && young {
                continue;
            }
            if !lock::try_lock(&file, LockKind::Exclusive).map_err(io_error("lock", &path))? {
                continue;
            }
            // Still the file locked: a retried post or a new answer renamed
            // over the name since the open is somebody's, and stays.
            let same = std::fs::symlink_metadata(&path)
                .is_ok_and(|now| (now.dev(), now.ino()) == (held.dev(), held.ino()));
            if same {
                sysfs::remove_if_present(&path).map_err(io_error("remove", &path))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Whether any answer of `node` is still held by a guardian: a freeze
    /// that some process of this node still answers for.
    pub fn node_has_live_freeze(&self, node: &str) -> Result<bool, PoolError> {
        let dir = self.freeze_dir();
        let suffix = format!("@{node}.answer");
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_error("list", &dir)(e)),
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if !name.to_str().is_some_and(|n| n.ends_with(&suffix)) {
                continue;
            }
            let Ok(file) = OpenOptions::new().read(true).write(true).open(entry.path()) else {
                continue;
            };
            if !lock::try_lock(&file, LockKind::Shared).map_err(io_error("lock", &entry.path()))? {
                return Ok(true);
            }
        }
        Ok(false)
    }
}
