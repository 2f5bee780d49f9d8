//! The UNIX socket the driver listens on: parsing the endpoint, claiming the
//! path safely, binding with tight permissions, and removing it at exit.
//!
//! gRPC core removes a stale socket file by itself, but it also silently
//! takes over a path that a live server is answering on, and it reports bind
//! failures only on stderr. So before binding, filevol decides for itself:
//! - a `<socket>.lock` file, flock'ed for the process's life, stops two
//!   filevol processes from racing for one path;
//! - a socket that accepts a connection belongs to a live server and is left
//!   alone (start-up fails);
//! - a socket that refuses connections is a crash's leftover and is replaced;
//! - anything that is not a socket is never deleted.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, Mode, OFlags};

use crate::endpoint::Endpoint;

/// Why the socket cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// The socket's directory could not be created.
    #[error("create socket directory {0}")]
    CreateDir(PathBuf, #[source] io::Error),
    /// The lock file could not be opened or locked.
    #[error("lock {0}")]
    Lock(PathBuf, #[source] io::Error),
    /// Another filevol process holds the lock for this socket.
    #[error("another filevol process is serving on {0} (its lock file is held)")]
    HeldByFilevol(PathBuf),
    /// A server answers on the socket.
    #[error("a live server is listening on {0}; stop it first or choose another --endpoint")]
    Live(PathBuf),
    /// Something other than a socket is at the path.
    #[error("{0} exists and is not a socket; it is left untouched")]
    NotASocket(PathBuf),
    /// The path could not be inspected.
    #[error("inspect {0}")]
    Inspect(PathBuf, #[source] io::Error),
    /// A stale socket could not be removed.
    #[error("remove stale socket {0}")]
    RemoveStale(PathBuf, #[source] io::Error),
    /// gRPC could not listen on the path.
    #[error("listen on {0} (gRPC core logged the reason above)")]
    Bind(PathBuf, #[source] grpcio::Error),
    /// The socket's permissions could not be set.
    #[error("set permissions of {0}")]
    Chmod(PathBuf, #[source] io::Error),
}

/// Exclusive use of a socket path for this process's life. Removes the
/// socket it bound when dropped (and only that socket: if something else
/// has replaced it meanwhile, it stays).
#[derive(Debug)]
pub struct SocketClaim {
    path: PathBuf,
    _lock: OwnedFd,
    bound_inode: Option<(u64, u64)>,
}

impl SocketClaim {
    /// Takes the path for this process: locks it against other filevol
    /// processes, refuses a live socket or a non-socket, removes a stale
    /// socket.
    pub fn claim(endpoint: &Endpoint) -> Result<SocketClaim, SocketError> {
        let path = endpoint.path().to_owned();
        if let Some(dir) = path.parent() {
            if !dir.exists() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o750)
                    .create(dir)
                    .map_err(|e| SocketError::CreateDir(dir.to_owned(), e))?;
            }
        }
        let lock_path = lock_path(&path);
        let lock = rustix::fs::open(
            &lock_path,
            OFlags::CREATE | OFlags::RDWR | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| SocketError::Lock(lock_path.clone(), e.into()))?;
        match rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => return Err(SocketError::HeldByFilevol(path)),
            Err(e) => return Err(SocketError::Lock(lock_path, e.into())),
        }

        match std::fs::symlink_metadata(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(SocketError::Inspect(path, e)),
            Ok(meta) if !meta.file_type().is_socket() => return Err(SocketError::NotASocket(path)),
            Ok(_) => match std::os::unix::net::UnixStream::connect(&path) {
                Ok(_) => return Err(SocketError::Live(path)),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    log::warn!(
                        "removing stale socket {} left by an earlier run",
                        path.display()
                    );
                    std::fs::remove_file(&path)
                        .map_err(|e| SocketError::RemoveStale(path.clone(), e))?;
                }
                Err(e) => return Err(SocketError::Inspect(path, e)),
            },
        }
        Ok(SocketClaim {
            path,
            _lock: lock,
            bound_inode: None,
        })
    }

    /// Makes `server` listen on the claimed path, with the socket created no
    /// wider than `mode` from the first instant.
    pub fn bind(&mut self, server: &mut grpcio::Server, mode: u32) -> Result<(), SocketError> {
        let address = format!("unix:{}", self.path.display());
        // bind(2) creates the file with 0777 & ~umask; a tight umask for the
        // moment of the bind means the socket is never reachable by more
        // users than `mode` allows. Nothing else creates files at this point
        // of start-up, so the process-wide umask change is safe.
        let old = rustix::process::umask(Mode::from_raw_mode(0o177));
        let bound = server.add_listening_port(address, grpcio::ServerCredentials::insecure());
        rustix::process::umask(old);
        bound.map_err(|e| SocketError::Bind(self.path.clone(), e))?;
        std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| SocketError::Chmod(self.path.clone(), e))?;
        let meta = std::fs::symlink_metadata(&self.path)
            .map_err(|e| SocketError::Inspect(self.path.clone(), e))?;
        self.bound_inode = Some((meta.dev(), meta.ino()));
        Ok(())
    }
}

impl Drop for SocketClaim {
    fn drop(&mut self) {
        let Some(bound) = self.bound_inode else {
            return;
        };
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if meta.file_type().is_socket() && (meta.dev(), meta.ino()) == bound {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    log::warn!("remove socket {}: {e}", self.path.display());
                }
            }
        }
    }
}

fn lock_path(socket: &Path) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn stale_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("csi.sock");
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists(), "a dropped listener leaves its file");
        let _claim = SocketClaim::claim(&Endpoint::from_path(path.clone())).unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn live_socket_is_not_stolen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("csi.sock");
        let _live = UnixListener::bind(&path).unwrap();
        let err = SocketClaim::claim(&Endpoint::from_path(path.clone())).unwrap_err();
        assert!(matches!(err, SocketError::Live(_)), "{err}");
        assert!(path.exists());
    }

    #[test]
    fn regular_file_is_never_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("csi.sock");
        std::fs::write(&path, b"precious").unwrap();
        let err = SocketClaim::claim(&Endpoint::from_path(path.clone())).unwrap_err();
        assert!(matches!(err, SocketError::NotASocket(_)), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    }

    #[test]
    fn second_claim_in_another_process_is_refused() {
        // flock locks belong to the open file description, so a second open
        // in this process stands for a second process.
        let dir = tempfile::tempdir().unwrap();
        let ep = Endpoint::from_path(dir.path().join("csi.sock"));
        let _first = SocketClaim::claim(&ep).unwrap();
        let err = SocketClaim::claim(&ep).unwrap_err();
        assert!(matches!(err, SocketError::HeldByFilevol(_)), "{err}");
    }

    #[test]
    fn missing_directory_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let ep = Endpoint::from_path(dir.path().join("a/b/csi.sock"));
        let _claim = SocketClaim::claim(&ep).unwrap();
        assert!(dir.path().join("a/b").is_dir());
    }
}
