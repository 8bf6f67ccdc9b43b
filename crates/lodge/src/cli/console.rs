//! `lodge vm console`: the serial console on this terminal, over the API's WebSocket.
//! Ctrl-] detaches (as in telnet); every other key, Ctrl-C included, goes to the guest.

use std::io::{Read, Write};

use futures_util::{SinkExt, StreamExt};
use lodge_daemon::client::Client;
use lodge_vmm::console::RawTerminal;
use tokio_tungstenite::tungstenite::Message;

/// The detach key: Ctrl-] (GS, 0x1d).
pub const DETACH_KEY: u8 = 0x1d;

pub async fn attach(client: &Client, path: &str, name: &str) -> anyhow::Result<()> {
    let websocket = client.websocket(path).await?;
    let (mut to_daemon, mut from_daemon) = websocket.split();
    eprintln!("Connected to the console of {name}; detach with Ctrl-]");
    let terminal = RawTerminal::enter();
    let (input_sender, mut input) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    // Stdin blocks; a thread feeds it in. It ends with the process.
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buffer = [0u8; 1024];
        loop {
            match stdin.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(count) => {
                    if input_sender
                        .blocking_send(buffer[..count].to_vec())
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    });
    let mut stdout = std::io::stdout();
    let mut stdin_open = true;
    let ending = loop {
        tokio::select! {
            message = from_daemon.next() => match message {
                Some(Ok(Message::Binary(bytes))) => {
                    stdout.write_all(&bytes)?;
                    stdout.flush()?;
                }
                Some(Ok(Message::Text(text))) => {
                    stdout.write_all(text.as_bytes())?;
                    stdout.flush()?;
                }
                Some(Ok(Message::Close(_))) | None => break "The console closed (the VM stopped)",
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    drop(terminal);
                    return Err(e.into());
                }
            },
            bytes = input.recv(), if stdin_open => match bytes {
                Some(bytes) => {
                    let (before, detach) = match bytes.iter().position(|&b| b == DETACH_KEY) {
                        Some(index) => (&bytes[..index], true),
                        None => (&bytes[..], false),
                    };
                    if !before.is_empty() {
                        to_daemon.send(Message::Binary(before.to_vec().into())).await?;
                    }
                    if detach {
                        let _ = to_daemon.send(Message::Close(None)).await;
                        break "Detached";
                    }
                }
                // Input ended (not a terminal): keep showing output until the console closes.
                None => stdin_open = false,
            },
        }
    };
    drop(terminal);
    eprintln!("\r\n{ending} from the console of {name}");
    Ok(())
}
