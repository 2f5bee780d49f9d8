//! The node's half of a group snapshot's freeze (the protocol is
//! [`pool::freeze`](crate::pool::freeze)): a loop of the node plugin looks
//! for requests naming volumes it has attached for writing, freezes their
//! filesystems through a guardian, answers, and thaws when the request is
//! withdrawn or abandoned.
//!
//! Why a guardian process: a freeze outlives the process that made it, and
//! a frozen filesystem blocks every write of the pods on it. So the freeze
//! is held by a child ([`guard`], the driver's hidden `freeze-guard`
//! subcommand) that
//! - thaws when its stdin closes, which the kernel does when this plugin
//!   exits for any reason, SIGKILL and OOM included;
//! - thaws after the request's `max_freeze_ms` whatever happens;
//! - ignores SIGINT, SIGTERM and SIGHUP, and holds the answer's lock until
//!   just before it thaws, so the controller knows whether the freeze held
//!   through its copies.
//!
//! If the guardian itself dies first, this plugin thaws through its own
//! descriptors of the mounts. If both die (the container's cgroup killed
//! at once), the next start of the plugin thaws every filesystem it has
//! staged ([`Node::thaw_left_frozen`]).
//!
//! A volume attached here for writing without a mounted filesystem (a raw
//! block volume) cannot be frozen: it is refused, and so is the group.

use std::collections::HashSet;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use parking_lot::Mutex;

use super::error::{sys, NodeError};
use super::{paths, Node};
use crate::pool::freeze::{FreezeAnswer, FreezeRequest};
use crate::pool::Pool;
use crate::sys::freeze as sysfreeze;

/// How a node plugin starts a guardian: its own executable and the
/// subcommand that runs [`guard`] (the driver decides both).
#[derive(Debug, Clone)]
pub struct GuardianCommand {
    /// The program (the driver passes `/proc/self/exe`: the binary this
    /// process runs, even after an upgrade replaced the file).
    pub program: PathBuf,
    /// The arguments before the guardian's own.
    pub args: Vec<OsString>,
}

/// One freeze this plugin holds through a guardian.
#[derive(Debug)]
struct Active {
    group: String,
    guardian: Child,
    /// Closing it tells the guardian to thaw.
    stdin: Option<ChildStdin>,
    /// This process's own descriptors of the frozen mounts: what it thaws
    /// through if the guardian dies first.
    mounts: Vec<(String, OwnedFd)>,
}

/// The freezes of this plugin, and the requests it has answered (each is
/// answered once, while it lasts).
#[derive(Debug, Default)]
pub(super) struct Freezes {
    active: Mutex<Vec<Active>>,
    answered: Mutex<HashSet<String>>,
}

impl Node {
    /// One turn of the node plugin's freeze loop: ends the freezes whose
    /// request was withdrawn or abandoned (or whose guardian died), then
    /// answers the live requests that name volumes this plugin has
    /// attached for writing.
    pub fn serve_freezes(&self, pool: &Pool, node_id: &str, guardian: &GuardianCommand) {
        let requests = match pool.freeze_requests() {
            Ok(r) => r,
            Err(e) => {
                log::warn!("freeze requests: {e}");
                return;
            }
        };
        let live: HashSet<&str> = requests
            .iter()
            .filter(|r| r.live)
            .map(|r| r.request.group.as_str())
            .collect();
        {
            let mut active = self.freezes.active.lock();
            let mut kept = Vec::new();
            for mut a in active.drain(..) {
                let died = matches!(a.guardian.try_wait(), Ok(Some(_)));
                if live.contains(a.group.as_str()) && !died {
                    kept.push(a);
                    continue;
                }
                if died {
                    log::warn!(
                        "group snapshot {}: the freeze guardian exited before the request ended",
                        a.group
                    );
                }
                end(&mut a);
                pool.remove_answer(&a.group, node_id);
            }
            *active = kept;
        }
        self.freezes
            .answered
            .lock()
            .retain(|g| live.contains(g.as_str()));
        for found in requests.iter().filter(|r| r.live) {
            let group = &found.request.group;
            if !self.freezes.answered.lock().insert(group.clone()) {
                continue;
            }
            // Answered by this node before a restart: a request is answered
            // once, so a controller never takes a second freeze, begun
            // half-way through its copies, for the first.
            if pool.has_answer(group, node_id) {
                continue;
            }
            match self.answer(pool, node_id, &found.request, guardian) {
                Ok(Some(a)) => self.freezes.active.lock().push(a),
                Ok(None) => {}
                Err(e) => {
                    log::warn!(
                        "group snapshot {group}: cannot answer the freeze request: {}",
                        crate::error_chain::message_chain(&e)
                    );
                    // Refuse in words rather than leave the controller
                    // waiting for an answer that will not come.
                    let refused = found
                        .request
                        .volumes
                        .iter()
                        .map(|v| (v.clone(), e.to_string()))
                        .collect();
                    let answer = FreezeAnswer {
                        node: node_id.to_owned(),
                        frozen: Vec::new(),
                        refused,
                    };
                    if let Err(e) = pool
                        .begin_answer(group, node_id)
                        .and_then(|f| f.publish(&answer))
                    {
                        log::warn!("group snapshot {group}: cannot answer: {e}");
                    }
                }
            }
        }
    }

    /// Ends every freeze this plugin holds (at shutdown).
    pub fn end_freezes(&self, pool: &Pool, node_id: &str) {
        for mut a in self.freezes.active.lock().drain(..) {
            end(&mut a);
            pool.remove_answer(&a.group, node_id);
        }
    }

    /// At start: thaws every filesystem this plugin has staged, unless a
    /// guardian of this node still holds a freeze (its plugin restarted
    /// while it works: it thaws on its own). What is thawed was left
    /// frozen by a guardian and a plugin that died together.
    pub fn thaw_left_frozen(&self, pool: &Pool, node_id: &str) {
        match pool.node_has_live_freeze(node_id) {
            Ok(false) => {}
            Ok(true) => {
                log::info!("a freeze guardian of this node is still working; it thaws on its own");
                return;
            }
            Err(e) => {
                log::warn!("cannot tell whether a freeze is in progress ({e}); nothing thawed");
                return;
            }
        }
        let mounts = match self.filesystems(pool) {
            Ok(m) => m,
            Err(e) => {
                log::warn!("cannot list staged filesystems to thaw: {e}");
                return;
            }
        };
        for m in mounts {
            let thawed = paths::open_dir(&self.kubelet_dir, &m.mount_point)
                .and_then(|fd| sysfreeze::thaw(fd.as_fd()));
            match thawed {
                Ok(true) => log::warn!(
                    "volume {}: its filesystem at {} was left frozen (by a freeze guardian that died with its plugin); thawed",
                    m.id,
                    m.mount_point.display()
                ),
                Ok(false) => {}
                Err(e) => log::warn!(
                    "volume {}: cannot thaw {}: {e}",
                    m.id,
                    m.mount_point.display()
                ),
            }
        }
    }

    /// Answers one request: `Ok(None)` when nothing of it is this plugin's
    /// to freeze (or it refused in its answer), else the freeze held.
    fn answer(
        &self,
        pool: &Pool,
        node_id: &str,
        request: &FreezeRequest,
        guardian: &GuardianCommand,
    ) -> Result<Option<Active>, NodeError> {
        let mut writers = Vec::new();
        for (id, _, device) in self.devices.entries() {
            if !request.volumes.contains(&id) {
                continue;
            }
            let read_only = self
                .kernel
                .read_only(device)
                .map_err(sys("read the state of", device.path()))?;
            if !read_only {
                writers.push((id, device));
            }
        }
        if writers.is_empty() {
            return Ok(None);
        }
        let filesystems = self.filesystems(pool)?;
        let mut mounts = Vec::new();
        let mut refused = Vec::new();
        for (id, device) in writers {
            let Some(m) = filesystems.iter().find(|m| m.device == device) else {
                refused.push((
                    id,
                    format!(
                        "attached for writing to {} with no filesystem mounted (a raw block volume): a block device cannot be frozen",
                        device.path().display()
                    ),
                ));
                continue;
            };
            let root = paths::open_dir(&self.kubelet_dir, &m.mount_point)
                .map_err(sys("open", &m.mount_point))?;
            // Only through the mount the table named (as a trim does).
            let on = self
                .kernel
                .mount_id(root.as_fd())
                .map_err(sys("stat", &m.mount_point))?;
            if on != m.mount_id {
                refused.push((id, "its stage is changing; try again".into()));
                continue;
            }
            mounts.push((id, root));
        }
        let file = pool.begin_answer(&request.group, node_id)?;
        if !refused.is_empty() {
            file.publish(&FreezeAnswer {
                node: node_id.to_owned(),
                frozen: Vec::new(),
                refused,
            })?;
            return Ok(None);
        }
        let mut command = Command::new(&guardian.program);
        command
            .args(&guardian.args)
            .arg("--max-ms")
            .arg(request.max_freeze_ms.to_string())
            .arg("--answer-fd")
            .arg(file.file().as_raw_fd().to_string());
        for (_, fd) in &mounts {
            command.arg("--fd").arg(fd.as_raw_fd().to_string());
        }
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut passed = vec![file.file().as_fd()];
        passed.extend(mounts.iter().map(|(_, fd)| fd.as_fd()));
        sysfreeze::pass_fds(&mut command, &passed);
        let mut child = command
            .spawn()
            .map_err(sys("start the freeze guardian", &guardian.program))?;
        let stdin = child.stdin.take();
        let said = child
            .stdout
            .take()
            .map(|out| {
                let mut line = String::new();
                BufReader::new(out).read_line(&mut line).map(|_| line)
            })
            .transpose()
            .map_err(sys("read from the freeze guardian", &guardian.program))?
            .unwrap_or_default();
        let mut active = Active {
            group: request.group.clone(),
            guardian: child,
            stdin,
            mounts,
        };
        if said.trim() != "frozen" {
            end(&mut active);
            let why = said
                .trim()
                .strip_prefix("failed: ")
                .unwrap_or("the freeze guardian stopped")
                .to_owned();
            file.publish(&FreezeAnswer {
                node: node_id.to_owned(),
                frozen: Vec::new(),
                refused: active
                    .mounts
                    .iter()
                    .map(|(id, _)| (id.clone(), format!("cannot freeze: {why}")))
                    .collect(),
            })?;
            return Ok(None);
        }
        let frozen: Vec<String> = active.mounts.iter().map(|(id, _)| id.clone()).collect();
        log::info!(
            "group snapshot {}: froze {} for at most {} ms",
            request.group,
            frozen.join(", "),
            request.max_freeze_ms
        );
        if let Err(e) = file.publish(&FreezeAnswer {
            node: node_id.to_owned(),
            frozen,
            refused: Vec::new(),
        }) {
            end(&mut active);
            return Err(e.into());
        }
        Ok(Some(active))
    }
}

/// Ends a freeze: closes the guardian's stdin (it thaws and exits), waits
/// for it, and thaws through this process's own descriptors if the
/// guardian did not end well.
fn end(a: &mut Active) {
    drop(a.stdin.take());
    let clean = match a.guardian.wait() {
        Ok(status) => status.success(),
        Err(e) => {
            log::warn!("group snapshot {}: freeze guardian: {e}", a.group);
            false
        }
    };
    if clean {
        return;
    }
    for (id, fd) in &a.mounts {
        match sysfreeze::thaw(fd.as_fd()) {
            Ok(true) => log::warn!(
                "volume {id}: thawed after its freeze guardian failed (group snapshot {})",
                a.group
            ),
            Ok(false) => {}
            Err(e) => log::error!("volume {id}: cannot thaw: {e}"),
        }
    }
}

/// The guardian (the driver's `freeze-guard` subcommand): freezes the
/// filesystems of the descriptors `fds` it inherited, says `frozen` on
/// stdout, and thaws when stdin closes or `max` has passed. Holds `answer`
/// (the answer's locked file) until just before it thaws. Returns whether
/// every thaw succeeded.
pub fn guard(answer: RawFd, fds: &[RawFd], max: Duration) -> bool {
    sysfreeze::ignore_stop_signals();
    let mut out = std::io::stdout();
    let opened: std::io::Result<Vec<OwnedFd>> =
        fds.iter().map(|&fd| sysfreeze::inherited(fd)).collect();
    let answer = sysfreeze::inherited(answer);
    let (fds, answer) = match (opened, answer) {
        (Ok(f), Ok(a)) => (f, a),
        (Err(e), _) | (_, Err(e)) => {
            let _ = writeln!(out, "failed: a descriptor handed to the guardian: {e}");
            return false;
        }
    };
    let mut frozen = Vec::new();
    for fd in &fds {
        if let Err(e) = sysfreeze::freeze(fd.as_fd()) {
            thaw_all(&frozen);
            let _ = writeln!(out, "failed: FIFREEZE: {e}");
            return false;
        }
        frozen.push(fd);
    }
    if writeln!(out, "frozen").and_then(|()| out.flush()).is_err() {
        // The parent is gone already: nobody will copy.
        drop(answer);
        return thaw_all(&frozen);
    }
    wait_for_close_or(max);
    // Let go of the lock first: "locked" must always mean "frozen".
    drop(answer);
    let ok = thaw_all(&frozen);
    let _ = writeln!(out, "thawed");
    ok
}

/// Thaws each of `fds`; false if any thaw failed (said on stderr, which
/// is the node plugin's log).
fn thaw_all(fds: &[&OwnedFd]) -> bool {
    let mut ok = true;
    for fd in fds {
        if let Err(e) = sysfreeze::thaw(fd.as_fd()) {
            log::error!("freeze guardian: FITHAW: {e}");
            ok = false;
        }
    }
    ok
}

/// Waits until stdin is closed (or readable) or `max` has passed.
fn wait_for_close_or(max: Duration) {
    use rustix::event::{poll, PollFd, PollFlags};
    let deadline = std::time::Instant::now() + max;
    let stdin = std::io::stdin();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            log::warn!(
                "freeze guardian: thawing after {} ms, the longest a freeze may last",
                max.as_millis()
            );
            return;
        }
        let mut fds = [PollFd::new(&stdin, PollFlags::IN)];
        let timeout = rustix::event::Timespec::try_from(left).unwrap_or(rustix::event::Timespec {
            tv_sec: 1,
            tv_nsec: 0,
        });
        match poll(&mut fds, Some(&timeout)) {
            Ok(0) => continue,
            Ok(_) => return,
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return,
        }
    }
}
