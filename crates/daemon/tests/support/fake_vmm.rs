//! A stand-in for `lodge run --config VM.json` in supervised mode, for the daemon's tests:
//! it speaks the control protocol, serves the console socket, writes the console log and
//! the exit report, and boots nothing. Flags in the config's `append` list change its
//! behaviour:
//! - `fake.ignore_shutdown`: the power button does nothing (the daemon must force a stop);
//! - `fake.crash_after_ms=N`: after N ms, print a panic and end with status 1 and a report;
//! - `fake.vanish_after_ms=N`: after N ms, die by SIGKILL without a report;
//! - `fake.start_delay_ms=N`: wait N ms before opening the control socket;
//! - `fake.console_spam=N`: write N console lines at start (log rotation);
//! - `fake.pause_incomplete`: a pause parks the vCPUs but reports that one did not park (a
//!   second pause without a resume in between succeeds: by then it has parked).
//!
//! `image create NAME --output PATH` stands in for the image builder: for `debian` it writes a
//! 1 MiB file after 300 ms; any other name fails with a message.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lodge_contract::control::{handle_line, ControlTarget};
use lodge_contract::{EngineKind, ExitRecord, RunState, VmConfig, VmmStatus};

struct Console {
    log: PathBuf,
    limit: u64,
    clients: Vec<UnixStream>,
}

impl Console {
    fn write(&mut self, text: &str) {
        let size = std::fs::metadata(&self.log).map_or(0, |m| m.len());
        if size + text.len() as u64 > self.limit {
            let mut old = self.log.clone().into_os_string();
            old.push(".1");
            let _ = std::fs::rename(&self.log, old);
        }
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
        {
            let _ = file.write_all(text.as_bytes());
        }
        self.clients
            .retain_mut(|client| client.write_all(text.as_bytes()).is_ok());
    }
}

struct Vmm {
    console: Mutex<Console>,
    paused: AtomicBool,
    start: Instant,
    booted_ms: Mutex<Option<u64>>,
    exit_file: PathBuf,
    ignore_shutdown: bool,
    pause_incomplete: bool,
}

impl Vmm {
    fn exit(&self, reason: &str, status: i32) -> ! {
        let record = ExitRecord {
            reason: reason.to_owned(),
            status,
            boot_time_ms: *self.booted_ms.lock().unwrap(),
        };
        record.write(&self.exit_file).expect("write exit file");
        eprintln!("fake-vmm: {reason}");
        std::process::exit(status);
    }
}

/// Answers as the real control socket does (the contract's `handle_line` drives both).
impl ControlTarget for &'static Vmm {
    fn pause(&self) -> Result<(), String> {
        let was_paused = self.paused.swap(true, Ordering::SeqCst);
        // The stuck vCPU parks late: a pause repeated without a resume in between finds
        // every vCPU parked, as the real VMM would.
        if self.pause_incomplete && !was_paused {
            return Err("1 of 1 vCPUs still running after 2s".into());
        }
        Ok(())
    }

    fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }

    fn press_power_button(&self) {
        if self.ignore_shutdown {
            return;
        }
        self.console
            .lock()
            .unwrap()
            .write("fake: power button pressed, powering off\n");
        let vmm: &'static Vmm = self;
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            vmm.exit("Guest powered off", 0);
        });
    }

    fn stop(&self) {
        let vmm: &'static Vmm = self;
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            vmm.exit("Stopped on request", 0);
        });
    }

    fn status(&self) -> VmmStatus {
        VmmStatus {
            state: if self.paused.load(Ordering::SeqCst) {
                RunState::Paused
            } else {
                RunState::Running
            },
            boot_time_ms: *self.booted_ms.lock().unwrap(),
            pid: std::process::id(),
            engine: EngineKind::Emulator,
        }
    }
}

fn flag(append: &[String], name: &str) -> Option<u64> {
    append.iter().find_map(|item| {
        if item == name {
            Some(0)
        } else {
            item.strip_prefix(&format!("{name}="))
                .and_then(|v| v.parse().ok())
        }
    })
}

/// `image create NAME --output PATH`.
fn image_create(args: &[String]) -> ! {
    assert!(
        args.len() == 5 && args[0] == "image" && args[1] == "create" && args[3] == "--output",
        "usage: image create NAME --output PATH"
    );
    std::thread::sleep(Duration::from_millis(300));
    if args[2] != "debian" {
        eprintln!("lodge image: error: fake builder knows only debian");
        std::process::exit(1);
    }
    let file = std::fs::File::create(&args[4]).expect("the output file");
    file.set_len(1 << 20).unwrap();
    std::process::exit(0);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("image") {
        image_create(&args[1..]);
    }
    assert!(
        args.len() == 4 && args[1] == "run" && args[2] == "--config",
        "usage: run --config FILE"
    );
    let config = VmConfig::from_file(args[3].as_ref()).expect("a valid VM config");
    let supervision = config.supervision;
    let path = |what: &str, path: Option<PathBuf>| path.unwrap_or_else(|| panic!("{what} missing"));
    let append = config.machine.append;
    let console_log = path(
        "console_log",
        supervision.console_log.as_ref().map(|log| log.path.clone()),
    );
    let console_log_limit = supervision.console_log.as_ref().map_or(0, |log| log.limit);
    eprintln!("fake-vmm: pid {} config {}", std::process::id(), args[3]);
    let vmm: &'static Vmm = Box::leak(Box::new(Vmm {
        console: Mutex::new(Console {
            log: console_log,
            limit: console_log_limit,
            clients: Vec::new(),
        }),
        paused: AtomicBool::new(false),
        start: Instant::now(),
        booted_ms: Mutex::new(None),
        exit_file: path("exit_file", supervision.exit_file),
        ignore_shutdown: flag(&append, "fake.ignore_shutdown").is_some(),
        pause_incomplete: flag(&append, "fake.pause_incomplete").is_some(),
    }));
    if let Some(delay) = flag(&append, "fake.start_delay_ms") {
        std::thread::sleep(Duration::from_millis(delay));
    }
    vmm.console.lock().unwrap().write("fake: booting\n");
    if let Some(lines) = flag(&append, "fake.console_spam") {
        for i in 0..lines {
            vmm.console
                .lock()
                .unwrap()
                .write(&format!("fake: console line {i}\n"));
        }
    }

    let console = UnixListener::bind(path("console_socket", supervision.console_socket)).unwrap();
    std::thread::spawn(move || {
        for client in console.incoming().flatten() {
            let reader = client.try_clone().unwrap();
            vmm.console.lock().unwrap().clients.push(client);
            std::thread::spawn(move || {
                let mut reader = reader;
                let mut buffer = [0u8; 256];
                while let Ok(count) = reader.read(&mut buffer) {
                    if count == 0 {
                        break;
                    }
                    let text = String::from_utf8_lossy(&buffer[..count]).into_owned();
                    vmm.console.lock().unwrap().write(&format!("echo:{text}"));
                }
            });
        }
    });

    let api = UnixListener::bind(path("api_socket", supervision.api_socket)).unwrap();
    std::thread::spawn(move || {
        for client in api.incoming().flatten() {
            std::thread::spawn(move || {
                let mut writer = client.try_clone().unwrap();
                for line in BufReader::new(client).split(b'\n') {
                    let Ok(line) = line else { break };
                    if writer
                        .write_all(&handle_line(&vmm, &line).to_line())
                        .is_err()
                    {
                        break;
                    }
                }
            });
        }
    });

    std::thread::sleep(Duration::from_millis(100));
    // The banner first: once the boot time is reported, the banner is in the log.
    vmm.console
        .lock()
        .unwrap()
        .write("Welcome to the fake guest\n");
    *vmm.booted_ms.lock().unwrap() = Some(vmm.start.elapsed().as_millis() as u64);

    if let Some(after) = flag(&append, "fake.crash_after_ms") {
        std::thread::sleep(Duration::from_millis(after));
        vmm.console
            .lock()
            .unwrap()
            .write("Kernel panic - not syncing: fake crash\n");
        vmm.exit("Triple fault (fake)", 1);
    }
    if let Some(after) = flag(&append, "fake.vanish_after_ms") {
        std::thread::sleep(Duration::from_millis(after));
        vmm.console.lock().unwrap().write("fake: vanishing\n");
        // SAFETY: kill only sends a signal, to this process.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
