//! The host daemon: a persistent inventory of VMs and disks (SQLite), one supervised VMM
//! process per running VM, and the REST API that manages them.
//!
//! Entry points: [`run`] for `lodge daemon`, [`Daemon::bind`] + [`Daemon::serve`] to embed
//! it (the tests do), and [`client::Client`] to talk to it.

pub mod api;
pub mod capacity;
pub mod client;
pub mod config;
pub mod db;
pub mod inventory;
pub mod model;
pub mod storage;
pub mod supervisor;
pub mod vmm;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::{TcpListener, UnixListener};

pub use config::DaemonConfig;
pub use inventory::Inventory;

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("Another lodge daemon is using {0}")]
    Locked(String),
    #[error("Cannot prepare {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot listen on {address}")]
    Listen {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Inventory(#[from] inventory::InventoryError),
    #[error("The API server failed")]
    Serve(#[source] std::io::Error),
}

/// A daemon with its state loaded and its sockets bound, ready to serve.
pub struct Daemon {
    inventory: Arc<Inventory>,
    unix: UnixListener,
    tcp: Option<(TcpListener, String)>,
    /// Removes the API socket's file when the daemon ends.
    _socket_file: SocketFile,
    /// Holds the state directory's lock for the daemon's life.
    _lock: File,
}

impl Daemon {
    /// Locks the state directory, opens the database, re-adopts running VMMs, and binds the
    /// API sockets. Runs inside a Tokio runtime.
    pub async fn bind(config: DaemonConfig) -> Result<Self, DaemonError> {
        let paths = config.paths();
        for dir in [&paths.state_dir, &paths.run_dir] {
            std::fs::create_dir_all(dir).map_err(|source| io_error(dir, source))?;
        }
        let lock = lock_state_dir(&paths.lock_file())?;
        let inventory = Inventory::open(config.clone())?;
        let reconciled = inventory.reconcile()?;
        tracing::info!(
            adopted = reconciled.adopted,
            vanished = reconciled.vanished,
            interrupted_imports = reconciled.interrupted_imports,
            "Inventory loaded"
        );
        inventory.start_host_network().await?;
        if let Some(parent) = config.socket.parent() {
            std::fs::create_dir_all(parent).map_err(|source| io_error(parent, source))?;
        }
        let (unix, socket_file) = bind_api_socket(&config.socket)?;
        let tcp = match &config.tcp {
            Some(tcp) => {
                let listener =
                    TcpListener::bind(tcp.addr)
                        .await
                        .map_err(|source| DaemonError::Listen {
                            address: tcp.addr.to_string(),
                            source,
                        })?;
                Some((listener, tcp.token.clone()))
            }
            None => None,
        };
        tracing::info!(socket = %config.socket.display(), "API listening");
        Ok(Self {
            inventory,
            unix,
            tcp,
            _socket_file: socket_file,
            _lock: lock,
        })
    }

    pub fn inventory(&self) -> &Arc<Inventory> {
        &self.inventory
    }

    /// The bound TCP address, if any (useful with port 0).
    pub fn tcp_address(&self) -> Option<std::net::SocketAddr> {
        self.tcp.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// Serves the API until an error. VMs keep running when this future is dropped.
    pub async fn serve(self) -> Result<(), DaemonError> {
        let unix_router = api::router(self.inventory.clone());
        let unix = axum::serve(self.unix, unix_router);
        match self.tcp {
            Some((listener, token)) => {
                let tcp_router = api::router_with_token(self.inventory.clone(), token);
                let tcp = axum::serve(listener, tcp_router);
                tokio::try_join!(unix, tcp).map(|_| ())
            }
            None => unix.await,
        }
        .map_err(DaemonError::Serve)
    }
}

/// Runs the daemon until SIGTERM or SIGINT. VMs keep running after it ends.
pub fn run(config: DaemonConfig) -> Result<(), DaemonError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|source| io_error(Path::new("tokio runtime"), source))?;
    runtime.block_on(async {
        let daemon = Daemon::bind(config).await?;
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .map_err(|source| io_error(Path::new("SIGTERM handler"), source))?;
        let result = tokio::select! {
            result = daemon.serve() => result,
            _ = tokio::signal::ctrl_c() => Ok(()),
            _ = terminate.recv() => Ok(()),
        };
        tracing::info!("Daemon stopping; VMs keep running");
        result
    })?;
    runtime.shutdown_background();
    Ok(())
}

fn lock_state_dir(path: &Path) -> Result<File, DaemonError> {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|source| io_error(path, source))?;
    // SAFETY: flock on a descriptor owned by `file`, which outlives the call.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if locked != 0 {
        let parent = path.parent().unwrap_or(path);
        return Err(DaemonError::Locked(parent.display().to_string()));
    }
    Ok(file)
}

/// Binds the API socket with mode 0660. A stale socket file is replaced (the state
/// directory's lock proves no other daemon of it serves there); any other file is kept, and
/// the bind fails.
fn bind_api_socket(path: &Path) -> Result<(UnixListener, SocketFile), DaemonError> {
    let listen_error = |source| DaemonError::Listen {
        address: path.display().to_string(),
        source,
    };
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        std::fs::remove_file(path).map_err(|source| io_error(path, source))?;
    }
    let listener = UnixListener::bind(path).map_err(listen_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|source| io_error(path, source))?;
    let metadata = std::fs::symlink_metadata(path).map_err(|source| io_error(path, source))?;
    let file = SocketFile {
        path: path.to_owned(),
        identity: (metadata.dev(), metadata.ino()),
    };
    Ok((listener, file))
}

/// The API socket's file, removed on drop unless another daemon bound one in its place.
struct SocketFile {
    path: PathBuf,
    /// Device and inode.
    identity: (u64, u64),
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| (m.dev(), m.ino()) == self.identity);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn io_error(path: &Path, source: std::io::Error) -> DaemonError {
    DaemonError::Io {
        path: path.display().to_string(),
        source,
    }
}
