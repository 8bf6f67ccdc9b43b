//! What a supervisor adds to a machine before it runs: the console log, the console socket
//! and the control socket of [`lodge_contract::Supervision`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use lodge_contract::Supervision;

use crate::console_sinks::{CappedLog, ConsoleSocket};
use crate::control::ControlSocket;
use crate::machine::Machine;

/// A supervision file or socket that cannot be opened.
#[derive(Debug, thiserror::Error)]
#[error("Cannot open the {what} at {path}")]
pub struct SupervisionError {
    what: &'static str,
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// Opens the console log and binds the console and control sockets `supervision` names,
/// served by `machine`'s event loop once it runs.
pub fn attach(machine: &mut Machine, supervision: &Supervision) -> Result<(), SupervisionError> {
    if let Some(log) = &supervision.console_log {
        let capped =
            CappedLog::open(&log.path, log.limit).map_err(failed("console log", &log.path))?;
        machine.console_taps().set_log(capped);
    }
    if let Some(path) = &supervision.console_socket {
        let socket = ConsoleSocket::bind(path, machine.console_taps(), machine.serial())
            .map_err(failed("console socket", path))?;
        machine.add_subscriber(Arc::new(Mutex::new(socket)));
    }
    if let Some(path) = &supervision.api_socket {
        let control =
            ControlSocket::bind(path, machine.handle()).map_err(failed("control socket", path))?;
        machine.add_subscriber(Arc::new(Mutex::new(control)));
    }
    Ok(())
}

fn failed<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> SupervisionError + 'a {
    move |source| SupervisionError {
        what,
        path: path.to_owned(),
        source,
    }
}
