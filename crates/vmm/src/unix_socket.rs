//! The listening Unix sockets a supervised VMM serves from its event loop (control and
//! console): bound over a stale socket file, accepting without blocking, and removing their
//! file when the VMM ends.

use std::io::{self, ErrorKind};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// A non-blocking Unix listener whose socket file is removed when it is dropped.
pub struct UnixSocketListener {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file, so a file another process bound in its place
    /// since is left alone.
    identity: (u64, u64),
}

impl UnixSocketListener {
    /// Binds at `path`, replacing a stale socket there. Any other kind of file is left in
    /// place (and the bind fails).
    pub fn bind(path: &Path) -> io::Result<Self> {
        match std::fs::symlink_metadata(path) {
            Ok(metadata) if metadata.file_type().is_socket() => std::fs::remove_file(path)?,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        let metadata = std::fs::symlink_metadata(path)?;
        Ok(Self {
            listener,
            path: path.to_owned(),
            identity: (metadata.dev(), metadata.ino()),
        })
    }

    /// Accepts every client waiting, each made non-blocking, and hands it to `accepted`.
    /// `what` names the socket in log lines.
    pub fn accept_pending(&self, what: &str, mut accepted: impl FnMut(UnixStream)) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => match stream.set_nonblocking(true) {
                    Ok(()) => accepted(stream),
                    Err(e) => tracing::warn!("{what} client setup failed: {e}"),
                },
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!("{what} accept failed: {e}");
                    return;
                }
            }
        }
    }
}

impl AsRawFd for UnixSocketListener {
    fn as_raw_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }
}

impl Drop for UnixSocketListener {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|metadata| (metadata.dev(), metadata.ino()) == self.identity);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_a_stale_socket_and_removes_its_own_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let stale = UnixListener::bind(&path).unwrap();
        let listener = UnixSocketListener::bind(&path).unwrap();
        drop(stale);
        let _client = UnixStream::connect(&path).unwrap();
        let mut accepted = 0;
        listener.accept_pending("test socket", |_| accepted += 1);
        assert_eq!(accepted, 1);
        drop(listener);
        assert!(!path.exists(), "socket file left behind");
    }

    #[test]
    fn leaves_other_files_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notes.txt");
        std::fs::write(&path, "keep me").unwrap();
        assert!(UnixSocketListener::bind(&path).is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me");
    }

    #[test]
    fn leaves_a_socket_bound_in_its_place_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let first = UnixSocketListener::bind(&path).unwrap();
        let second = UnixSocketListener::bind(&path).unwrap();
        drop(first);
        assert!(path.exists(), "the newer socket was removed");
        UnixStream::connect(&path).unwrap();
        drop(second);
        assert!(!path.exists());
    }
}
