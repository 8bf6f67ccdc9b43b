//! Hand-assembled guests run through the whole VMM (memory, boot, devices, vCPU threads, event
//! loop) on each engine: serial output, MMIO, the i8042 reset, the boot timer, stopping a
//! halted vCPU, triple faults.
//!
//! The software engine runs them everywhere. KVM tests skip with a printed reason where
//! `/dev/kvm` is unusable; they run on this project's PVM hosts (small guests work there).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use lodge_contract::{ByteSize, ConsoleConfig, ConsoleLogConfig, EngineChoice, VmConfig};
use lodge_kvm as kvm;
use lodge_testkit::{vmlinux_from_code, TEST_KERNEL_ENTRY};
use lodge_vmm::{engine_select, supervision};
use lodge_vmm::{ExitReason, Machine, MachineOptions, RunSummary};

/// A guest's kernel file, console log and config.
struct TestGuest {
    _kernel: tempfile::NamedTempFile,
    console: tempfile::NamedTempFile,
    config: VmConfig,
}

impl TestGuest {
    fn new(
        engine: EngineChoice,
        assemble: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
    ) -> Self {
        let mut asm = CodeAssembler::new(64).unwrap();
        assemble(&mut asm).unwrap();
        let code = asm.assemble(TEST_KERNEL_ENTRY).unwrap();
        let mut kernel = tempfile::NamedTempFile::new().unwrap();
        kernel.write_all(&vmlinux_from_code(&code)).unwrap();
        let console = tempfile::NamedTempFile::new().unwrap();
        let mut config = VmConfig::default();
        config.machine.kernel = kernel.path().to_owned();
        config.machine.memory = ByteSize::from_bytes(64 << 20);
        config.machine.engine = engine;
        config.machine.console = ConsoleConfig::File(console.path().to_owned());
        Self {
            _kernel: kernel,
            console,
            config,
        }
    }

    fn machine(&self) -> Machine {
        self.config.machine.validate(None).unwrap();
        let selected = engine_select::select(self.config.machine.engine).unwrap();
        let mut machine = Machine::build(
            &self.config.machine,
            selected.engine.as_ref(),
            MachineOptions::default(),
        )
        .unwrap();
        supervision::attach(&mut machine, &self.config.supervision).unwrap();
        machine
    }

    fn run(&self) -> RunSummary {
        self.machine().run().unwrap()
    }

    fn console_output(&self) -> String {
        std::fs::read_to_string(self.console.path()).unwrap()
    }
}

/// Whether KVM is usable here; prints why not.
fn kvm_available(test: &str) -> bool {
    match kvm::probe() {
        Ok(_) => true,
        Err(reason) => {
            println!("SKIP {test}: {reason}");
            false
        }
    }
}

/// Writes `text` to COM1 one byte at a time.
fn print(asm: &mut CodeAssembler, text: &str) -> Result<(), IcedError> {
    asm.mov(dx, 0x3f8u32)?;
    for byte in text.bytes() {
        asm.mov(al, byte as u32)?;
        asm.out(dx, al)?;
    }
    Ok(())
}

/// Pulses the reset line through the i8042 (what Linux does for `reboot=k`).
fn i8042_reset(asm: &mut CodeAssembler) -> Result<(), IcedError> {
    asm.mov(al, 0xfeu32)?;
    asm.out(0x64, al)?;
    let mut spin = asm.create_label();
    asm.set_label(&mut spin)?;
    asm.jmp(spin)
}

fn serial_boot_timer_and_reset(engine: EngineChoice) {
    let guest = TestGuest::new(engine, |asm| {
        print(asm, "Hello from the guest\n")?;
        // The boot timer is an MMIO device: this write crosses into the VMM.
        asm.mov(rax, 0xd000_0000u64)?;
        asm.mov(byte_ptr(rax), 123u32)?;
        i8042_reset(asm)
    });
    let summary = guest.run();
    assert_eq!(summary.reason, ExitReason::GuestReset);
    assert_eq!(summary.reason.exit_status(), 0);
    assert!(summary.boot_time.is_some(), "the boot timer saw the write");
    assert_eq!(guest.console_output(), "Hello from the guest\n");
}

fn reads_virtio_magic_over_mmio(engine: EngineChoice) {
    let guest = TestGuest::new(engine, |asm| {
        // Read the first virtio-mmio device's magic ("virt") and echo its bytes to COM1.
        asm.mov(rbx, 0xd000_1000u64)?;
        asm.mov(ebx, dword_ptr(rbx))?;
        asm.mov(dx, 0x3f8u32)?;
        for _ in 0..4 {
            asm.mov(al, bl)?;
            asm.out(dx, al)?;
            asm.shr(ebx, 8)?;
        }
        i8042_reset(asm)
    });
    let mut config_guest = guest;
    config_guest.config.machine.rng = true;
    let summary = config_guest.run();
    assert_eq!(summary.reason, ExitReason::GuestReset);
    assert_eq!(config_guest.console_output(), "virt");
}

/// Port accesses reach devices at the guest's width: a 2-byte `out` to COM1 after 1-byte
/// ones is one access (THR, then IER), not two writes to THR.
fn port_accesses_keep_their_width(engine: EngineChoice) {
    let guest = TestGuest::new(engine, |asm| {
        print(asm, "a")?;
        // Low byte 'b' to the transmit register, high byte 0 to the interrupt enable one.
        asm.mov(ax, 0x0062u32)?;
        asm.out(dx, ax)?;
        print(asm, "c")?;
        i8042_reset(asm)
    });
    let summary = guest.run();
    assert_eq!(summary.reason, ExitReason::GuestReset);
    assert_eq!(guest.console_output(), "abc");
}

fn pauses_and_stops_a_halted_guest(engine: EngineChoice) {
    let guest = TestGuest::new(engine, |asm| {
        print(asm, "halting\n")?;
        let mut halt = asm.create_label();
        asm.set_label(&mut halt)?;
        asm.sti()?;
        asm.hlt()?;
        asm.jmp(halt)
    });
    let machine = guest.machine();
    let handle = machine.handle();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        // A halted vCPU parks too (KVM does not return from `hlt` on its own here).
        let paused = handle.pause();
        handle.resume();
        handle.stop("test");
        paused
    });
    let started = Instant::now();
    let summary = machine.run().unwrap();
    assert_eq!(stopper.join().unwrap(), Ok(()), "the halted vCPU parked");
    assert_eq!(summary.reason, ExitReason::Stopped("test".into()));
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(guest.console_output(), "halting\n");
}

fn pause_and_resume(engine: EngineChoice) {
    // Prints a dot per iteration of a busy loop; while paused nothing may be printed.
    let guest = TestGuest::new(engine, |asm| {
        let mut top = asm.create_label();
        let mut delay = asm.create_label();
        asm.set_label(&mut top)?;
        asm.mov(dx, 0x3f8u32)?;
        asm.mov(al, b'.' as u32)?;
        asm.out(dx, al)?;
        asm.mov(ecx, 200_000u32)?;
        asm.set_label(&mut delay)?;
        asm.dec(ecx)?;
        asm.jnz(delay)?;
        asm.jmp(top)
    });
    let machine = guest.machine();
    let handle = machine.handle();
    let console = guest.console.path().to_owned();
    let controller = std::thread::spawn(move || {
        wait_for_output(&console, 2);
        handle.pause().unwrap();
        assert!(handle.is_paused());
        // Nothing written after pause returns: it waits for the vCPU to park.
        let paused_len = std::fs::metadata(&console).unwrap().len();
        std::thread::sleep(Duration::from_millis(500));
        let still = std::fs::metadata(&console).unwrap().len();
        handle.resume();
        wait_for_output(&console, still + 2);
        handle.stop("test");
        (paused_len, still)
    });
    let summary = machine.run().unwrap();
    let (paused_len, still) = controller.join().unwrap();
    assert_eq!(paused_len, still, "no output while paused");
    assert_eq!(summary.reason, ExitReason::Stopped("test".into()));
}

/// A guest that echoes serial input and resets when the power button is pressed, driven
/// through the console socket and the control socket as the daemon drives VMM processes.
fn sockets_drive_the_vm(engine: EngineChoice) {
    let mut guest = TestGuest::new(engine, |asm| {
        let mut top = asm.create_label();
        let mut check_button = asm.create_label();
        asm.mov(rbx, 0xd000_0100u64)?;
        asm.set_label(&mut top)?;
        asm.mov(dx, 0x3fdu32)?; // line status register
        asm.in_(al, dx)?;
        asm.test(al, 1)?;
        asm.jz(check_button)?;
        asm.mov(dx, 0x3f8u32)?;
        asm.in_(al, dx)?;
        asm.out(dx, al)?;
        asm.set_label(&mut check_button)?;
        asm.mov(al, byte_ptr(rbx))?;
        asm.test(al, al)?;
        asm.jz(top)?;
        print(asm, "shutting down\n")?;
        i8042_reset(asm)
    });
    let dir = tempfile::tempdir().unwrap();
    let api = dir.path().join("api.sock");
    let console = dir.path().join("console.sock");
    let log = dir.path().join("console.log");
    guest.config.supervision.api_socket = Some(api.clone());
    guest.config.supervision.console_socket = Some(console.clone());
    guest.config.supervision.console_log = Some(ConsoleLogConfig {
        path: log.clone(),
        limit: 1 << 20,
    });
    let machine = guest.machine();
    let runner = std::thread::spawn(move || machine.run().unwrap());

    let mut console_client = UnixStream::connect(&console).unwrap();
    console_client
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    console_client.write_all(b"ping").unwrap();
    let mut echoed = [0u8; 4];
    console_client.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed, b"ping");

    let mut control = BufReader::new(UnixStream::connect(&api).unwrap());
    let mut request = |line: &str| -> serde_json::Value {
        control
            .get_mut()
            .write_all(format!("{line}\n").as_bytes())
            .unwrap();
        let mut reply = String::new();
        control.read_line(&mut reply).unwrap();
        serde_json::from_str(&reply).unwrap()
    };
    let status = request(r#"{"request":"status"}"#);
    assert_eq!(status["ok"], true);
    assert_eq!(status["state"], "running");
    assert_eq!(status["pid"], std::process::id());
    assert_eq!(request(r#"{"request":"pause"}"#)["state"], "paused");
    assert_eq!(request(r#"{"request":"resume"}"#)["state"], "running");
    let bad = request(r#"{"request":"explode"}"#);
    assert_eq!(bad["ok"], false);
    assert!(bad["error"]
        .as_str()
        .unwrap()
        .starts_with("Invalid request"));
    assert_eq!(request(r#"{"request":"shutdown"}"#)["ok"], true);

    let summary = runner.join().unwrap();
    assert_eq!(summary.reason, ExitReason::GuestReset);
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "pingshutting down\n"
    );
    assert!(!api.exists(), "control socket file left behind");
    assert!(!console.exists(), "console socket file left behind");
}

/// A control client that sends requests without reading the responses is dropped once they
/// pile up; the VMM goes on serving the others.
#[test]
fn control_socket_outlives_a_client_that_does_not_read() {
    let mut guest = TestGuest::new(EngineChoice::Emulator, |asm| {
        let mut halt = asm.create_label();
        asm.set_label(&mut halt)?;
        asm.sti()?;
        asm.hlt()?;
        asm.jmp(halt)
    });
    let dir = tempfile::tempdir().unwrap();
    let api = dir.path().join("api.sock");
    guest.config.supervision.api_socket = Some(api.clone());
    let machine = guest.machine();
    let runner = std::thread::spawn(move || machine.run().unwrap());

    let mut flooder = UnixStream::connect(&api).unwrap();
    let (flood_result, flood_done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Far more responses than a socket buffer holds.
        let requests = "{\"request\":\"status\"}\n".repeat(1 << 16);
        let _ = flood_result.send(flooder.write_all(requests.as_bytes()));
    });
    let flooded = flood_done
        .recv_timeout(Duration::from_secs(30))
        .expect("the VMM neither served nor dropped the client");
    assert!(flooded.is_err(), "the VMM did not hang up on the client");

    let control = UnixStream::connect(&api).unwrap();
    control
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut control = BufReader::new(control);
    control
        .get_mut()
        .write_all(b"{\"request\":\"stop\"}\n")
        .unwrap();
    let mut reply = String::new();
    control
        .read_line(&mut reply)
        .expect("the VMM answers the next client");
    assert!(reply.contains(r#""ok":true"#), "{reply}");
    let summary = runner.join().unwrap();
    assert!(matches!(summary.reason, ExitReason::Stopped(_)));
}

fn wait_for_output(path: &Path, bytes: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::metadata(path).unwrap().len() < bytes {
        assert!(Instant::now() < deadline, "guest output did not arrive");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn triple_fault_is_reported(engine: EngineChoice) {
    let guest = TestGuest::new(engine, |asm| {
        // An IDT of limit 0: the #UD from ud2 cannot be delivered, nor the #DF: triple fault.
        asm.sub(rsp, 16)?;
        asm.xor(eax, eax)?;
        asm.mov(qword_ptr(rsp), rax)?;
        asm.mov(qword_ptr(rsp + 8), rax)?;
        asm.lidt(ptr(rsp))?;
        asm.ud2()
    });
    let summary = guest.run();
    match &summary.reason {
        ExitReason::TripleFault(state) => {
            assert!(
                state.regs.rip >= TEST_KERNEL_ENTRY,
                "registers are dumped: {state}"
            );
        }
        other => panic!("expected a triple fault, got {other}"),
    }
    assert_eq!(summary.reason.exit_status(), 1);
}

/// The reset pulse ends the VM as a reset whatever the guest runs right after it (Linux
/// goes on to other reset methods, which the software engine may not support).
fn reset_wins_over_what_follows_it(engine: EngineChoice) {
    let guest = TestGuest::new(engine, |asm| {
        asm.mov(al, 0xfeu32)?;
        asm.out(0x64, al)?;
        // Then at once a triple fault: an IDT of limit 0 and ud2.
        asm.sub(rsp, 16)?;
        asm.xor(eax, eax)?;
        asm.mov(qword_ptr(rsp), rax)?;
        asm.mov(qword_ptr(rsp + 8), rax)?;
        asm.lidt(ptr(rsp))?;
        asm.ud2()
    });
    for _ in 0..20 {
        assert_eq!(guest.run().reason, ExitReason::GuestReset);
    }
}

/// A reset ends the vCPU's run at the instruction that asked for it: the guest's next
/// instruction (here a write to the serial port) never runs. Through the i8042's reset line
/// (`reboot=k`) and through the reset control register at 0xCF9 (`reboot=p`).
fn nothing_runs_after_a_reset(engine: EngineChoice) {
    type Emit = fn(&mut CodeAssembler) -> Result<(), IcedError>;
    let methods: [(&str, Emit); 2] = [
        ("i8042", |asm| {
            asm.mov(al, 0xfeu32)?;
            asm.out(0x64, al)
        }),
        ("port 0xcf9", |asm| {
            asm.mov(dx, 0xcf9u32)?;
            asm.mov(al, 0x02u32)?;
            asm.out(dx, al)?;
            asm.mov(al, 0x06u32)?;
            asm.out(dx, al)
        }),
    ];
    for (name, reset) in methods {
        let guest = TestGuest::new(engine, |asm| {
            print(asm, "before\n")?;
            reset(asm)?;
            print(asm, "after\n")?;
            let mut spin = asm.create_label();
            asm.set_label(&mut spin)?;
            asm.jmp(spin)
        });
        for _ in 0..5 {
            let summary = guest.run();
            assert_eq!(summary.reason, ExitReason::GuestReset, "{name}");
            assert_eq!(summary.reason.exit_status(), 0);
        }
        assert_eq!(
            guest.console_output(),
            "before\n".repeat(5),
            "the guest ran on after the {name} reset"
        );
    }
}

#[test]
fn kvm_nothing_runs_after_a_reset() {
    if kvm_available("kvm_nothing_runs_after_a_reset") {
        nothing_runs_after_a_reset(EngineChoice::Kvm);
    }
}

#[test]
fn emulator_nothing_runs_after_a_reset() {
    nothing_runs_after_a_reset(EngineChoice::Emulator);
}

#[test]
fn kvm_reset_wins_over_what_follows_it() {
    if kvm_available("kvm_reset_wins_over_what_follows_it") {
        reset_wins_over_what_follows_it(EngineChoice::Kvm);
    }
}

#[test]
fn emulator_reset_wins_over_what_follows_it() {
    reset_wins_over_what_follows_it(EngineChoice::Emulator);
}

#[test]
fn kvm_serial_boot_timer_and_reset() {
    if kvm_available("kvm_serial_boot_timer_and_reset") {
        serial_boot_timer_and_reset(EngineChoice::Kvm);
    }
}

#[test]
fn kvm_reads_virtio_magic_over_mmio() {
    if kvm_available("kvm_reads_virtio_magic_over_mmio") {
        reads_virtio_magic_over_mmio(EngineChoice::Kvm);
    }
}

#[test]
fn kvm_port_accesses_keep_their_width() {
    if kvm_available("kvm_port_accesses_keep_their_width") {
        port_accesses_keep_their_width(EngineChoice::Kvm);
    }
}

#[test]
fn kvm_pauses_and_stops_a_halted_guest() {
    if kvm_available("kvm_pauses_and_stops_a_halted_guest") {
        pauses_and_stops_a_halted_guest(EngineChoice::Kvm);
    }
}

#[test]
fn kvm_pause_and_resume() {
    if kvm_available("kvm_pause_and_resume") {
        pause_and_resume(EngineChoice::Kvm);
    }
}

#[test]
fn kvm_sockets_drive_the_vm() {
    if kvm_available("kvm_sockets_drive_the_vm") {
        sockets_drive_the_vm(EngineChoice::Kvm);
    }
}

#[test]
fn kvm_triple_fault_is_reported() {
    if kvm_available("kvm_triple_fault_is_reported") {
        triple_fault_is_reported(EngineChoice::Kvm);
    }
}

fn halting_with_interrupts_off_powers_off(engine: EngineChoice) {
    let guest = TestGuest::new(engine, |asm| {
        print(asm, "bye\n")?;
        asm.cli()?;
        asm.hlt()
    });
    let summary = guest.run();
    assert_eq!(summary.reason, ExitReason::GuestPowerOff);
    assert_eq!(guest.console_output(), "bye\n");
}

#[test]
fn emulator_serial_boot_timer_and_reset() {
    serial_boot_timer_and_reset(EngineChoice::Emulator);
}

#[test]
fn emulator_reads_virtio_magic_over_mmio() {
    reads_virtio_magic_over_mmio(EngineChoice::Emulator);
}

#[test]
fn emulator_port_accesses_keep_their_width() {
    port_accesses_keep_their_width(EngineChoice::Emulator);
}

#[test]
fn emulator_pauses_and_stops_a_halted_guest() {
    pauses_and_stops_a_halted_guest(EngineChoice::Emulator);
}

#[test]
fn emulator_pause_and_resume() {
    pause_and_resume(EngineChoice::Emulator);
}

#[test]
fn emulator_sockets_drive_the_vm() {
    sockets_drive_the_vm(EngineChoice::Emulator);
}

#[test]
fn emulator_triple_fault_is_reported() {
    triple_fault_is_reported(EngineChoice::Emulator);
}

/// Only the software engine sees a halt with interrupts off: KVM keeps such a vCPU in the
/// kernel, where nothing can wake it.
#[test]
fn emulator_halting_with_interrupts_off_powers_off() {
    halting_with_interrupts_off_powers_off(EngineChoice::Emulator);
}
