//! Small hand-assembled long-mode guests run through the public engine API.

mod common;

use std::time::{Duration, Instant};

use common::*;
use iced_x86::code_asm::*;
use lodge_engine::{CpuState, VcpuExit};

#[test]
fn computes_and_halts() {
    let mut m = Machine::new(16 << 20);
    m.assemble(CODE, |a| {
        a.mov(rax, 40u64).unwrap();
        a.mov(rcx, 2u64).unwrap();
        a.add(rax, rcx).unwrap();
        a.mov(qword_ptr(0x20000), rax).unwrap();
        a.mov(rbx, qword_ptr(0x20000)).unwrap();
        a.push(rbx).unwrap();
        a.pop(rdx).unwrap();
        a.hlt().unwrap();
    });
    assert_eq!(m.run(), VcpuExit::Halted);
    let s = m.state();
    assert_eq!(s.regs.rax, 42);
    assert_eq!(s.regs.rdx, 42);
    assert_eq!(m.read_u64(0x20000), 42);
    assert_eq!(s.regs.rsp, STACK_TOP);
}

#[test]
fn loops_and_calls() {
    let mut m = Machine::new(16 << 20);
    m.assemble(CODE, |a| {
        let mut top = a.create_label();
        let mut func = a.create_label();
        let mut done = a.create_label();
        a.xor(eax, eax).unwrap();
        a.mov(ecx, 1000).unwrap();
        a.set_label(&mut top).unwrap();
        a.call(func).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(top).unwrap();
        a.jmp(done).unwrap();
        a.set_label(&mut func).unwrap();
        a.add(rax, 3).unwrap();
        a.ret().unwrap();
        a.set_label(&mut done).unwrap();
        a.hlt().unwrap();
    });
    assert_eq!(m.run(), VcpuExit::Halted);
    assert_eq!(m.state().regs.rax, 3000);
}

#[test]
fn port_io_reaches_the_bus() {
    let mut m = Machine::new(16 << 20);
    let dev = m.add_pio(0x3f8, 8);
    dev.lock().unwrap().read_value = 0x10;
    m.assemble(CODE, |a| {
        a.mov(dx, 0x3f8u32).unwrap();
        a.mov(al, 0x41u32).unwrap();
        a.out(dx, al).unwrap();
        a.mov(dx, 0x3fdu32).unwrap();
        a.in_(al, dx).unwrap();
        a.mov(bl, al).unwrap();
        a.hlt().unwrap();
    });
    assert_eq!(m.run(), VcpuExit::Halted);
    assert_eq!(dev.lock().unwrap().writes, vec![(0, vec![0x41])]);
    assert_eq!(m.state().regs.rbx & 0xff, 0x15);
}

#[test]
fn mmio_outside_ram_reaches_the_bus() {
    let mut m = Machine::new(16 << 20);
    let dev = m.add_mmio(0xd000_0000, 0x1000);
    dev.lock().unwrap().read_value = 0x20;
    // Identity map 0xd0000000 (3.25 GiB): add a PDPT entry with a 1 GiB page.
    m.write_u64(PDPT + 3 * 8, (3 << 30) | 0x83);
    m.assemble(CODE, |a| {
        a.mov(rdi, 0xd000_0000u64).unwrap();
        a.mov(dword_ptr(rdi + 0x10), 0x1234_5678).unwrap();
        a.mov(eax, dword_ptr(rdi + 4)).unwrap();
        a.hlt().unwrap();
    });
    assert_eq!(m.run(), VcpuExit::Halted);
    assert_eq!(
        dev.lock().unwrap().writes,
        vec![(0x10, 0x1234_5678u32.to_le_bytes().to_vec())]
    );
    assert_eq!(m.state().regs.rax, 0x2726_2524);
}

/// Programs the PIC like Linux (vectors 0x30/0x38) and unmasks `mask` (master, slave).
fn init_pic(a: &mut CodeAssembler, master_mask: u8, slave_mask: u8) {
    for (port, value) in [
        (0x20u8, 0x11u8),
        (0x21, 0x30),
        (0x21, 0x04),
        (0x21, 0x01),
        (0xa0, 0x11),
        (0xa1, 0x38),
        (0xa1, 0x02),
        (0xa1, 0x01),
        (0x21, master_mask),
        (0xa1, slave_mask),
    ] {
        a.mov(al, u32::from(value)).unwrap();
        a.out(i32::from(port), al).unwrap();
    }
}

/// Where `count_interrupts` counts.
const INTERRUPTS: u64 = 0x20000;

/// Points `vector` at a handler (at `CODE + 0x1000`) that counts at `INTERRUPTS`, sends the
/// master PIC a non-specific EOI and returns.
fn count_interrupts(m: &Machine, vector: u8) {
    let handler = CODE + 0x1000;
    m.set_gate(vector, handler, 0, 0);
    m.assemble(handler, |a| {
        a.inc(qword_ptr(INTERRUPTS)).unwrap();
        a.mov(al, 0x20u32).unwrap();
        a.out(0x20, al).unwrap();
        a.iretq().unwrap();
    });
}

/// Enables interrupts and halts until `INTERRUPTS` reaches `count`, then halts for good.
fn wait_for_interrupts(a: &mut CodeAssembler, count: i32) {
    let mut wait = a.create_label();
    a.sti().unwrap();
    a.set_label(&mut wait).unwrap();
    a.hlt().unwrap();
    a.cmp(qword_ptr(INTERRUPTS), count).unwrap();
    a.jb(wait).unwrap();
    a.cli().unwrap();
    a.hlt().unwrap();
}

#[test]
fn device_interrupt_wakes_hlt() {
    let mut m = Machine::new(16 << 20);
    count_interrupts(&m, 0x34);
    m.assemble(CODE, |a| {
        init_pic(a, !0x10, 0xff);
        wait_for_interrupts(a, 3);
    });
    let line = m.vm.interrupt_line(4).unwrap();
    let t = std::thread::spawn(move || {
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(20));
            line.trigger().unwrap();
        }
    });
    assert_eq!(m.run(), VcpuExit::Halted);
    t.join().unwrap();
    assert_eq!(m.read_u64(INTERRUPTS), 3);
}

#[test]
fn pit_ticks_at_its_programmed_rate() {
    let mut m = Machine::new(16 << 20);
    count_interrupts(&m, 0x30);
    m.assemble(CODE, |a| {
        init_pic(a, !0x01, 0xff);
        // Mode 2, 1193 ticks: 1 kHz.
        a.mov(al, 0x34u32).unwrap();
        a.out(0x43, al).unwrap();
        a.mov(al, 1193u32 & 0xff).unwrap();
        a.out(0x40, al).unwrap();
        a.mov(al, 1193u32 >> 8).unwrap();
        a.out(0x40, al).unwrap();
        wait_for_interrupts(a, 50);
    });
    let start = Instant::now();
    assert_eq!(m.run(), VcpuExit::Halted);
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(45),
        "50 ticks at 1 kHz took {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(5),
        "50 ticks at 1 kHz took {elapsed:?}"
    );
}

#[test]
fn stop_interrupts_a_busy_loop_and_a_halt() {
    let mut m = Machine::new(16 << 20);
    m.assemble(CODE, |a| {
        let mut spin = a.create_label();
        a.set_label(&mut spin).unwrap();
        a.inc(rax).unwrap();
        a.jmp(spin).unwrap();
    });
    let stopper = m.vcpu.stopper();
    let s2 = stopper.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        s2.stop();
    });
    assert_eq!(m.run(), VcpuExit::Stopped);
    t.join().unwrap();
    assert!(m.state().regs.rax > 1000);
    // Still stopped until resumed.
    assert_eq!(m.run(), VcpuExit::Stopped);
    stopper.resume();

    // Halted with interrupts enabled and nothing to wake it: only stop ends the run.
    m.assemble(CODE + 0x100, |a| {
        a.sti().unwrap();
        a.hlt().unwrap();
        a.jmp(CODE + 0x101).unwrap();
    });
    m.set_state(CODE + 0x100);
    let s3 = stopper.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        s3.stop();
    });
    let start = Instant::now();
    assert_eq!(m.run(), VcpuExit::Stopped);
    assert!(start.elapsed() < Duration::from_secs(2));
    t.join().unwrap();
}

#[test]
fn divide_error_goes_through_the_idt() {
    let mut m = Machine::new(16 << 20);
    let handler = CODE + 0x1000;
    m.set_gate(0, handler, 0, 0);
    m.assemble(handler, |a| {
        a.mov(rbx, qword_ptr(rsp)).unwrap(); // faulting RIP
        a.hlt().unwrap();
    });
    m.assemble(CODE, |a| {
        a.xor(ecx, ecx).unwrap();
        a.mov(eax, 1).unwrap();
        a.div(ecx).unwrap();
        a.hlt().unwrap();
    });
    assert_eq!(m.run(), VcpuExit::Halted);
    let s = m.state();
    assert_eq!(s.regs.rbx, CODE + 7, "pushed RIP is the DIV");
    assert_eq!(s.regs.rip, handler + 5);
}

#[test]
fn page_fault_reports_address_and_error_code() {
    let mut m = Machine::new(16 << 20);
    let handler = CODE + 0x1000;
    m.set_gate(14, handler, 0, 0);
    m.assemble(handler, |a| {
        a.pop(rbx).unwrap(); // error code
        a.mov(rcx, cr2).unwrap();
        a.hlt().unwrap();
    });
    // 0x40_0000 read-only, 0x40_1000 not present.
    m.map_page(0x40_0000, 0x40_0000, 0x5);
    m.map_page(0x40_1000, 0x40_1000, 0x0);
    m.write_u64(0x40_0ff8, 0x1122_3344_5566_7788);
    m.assemble(CODE, |a| {
        a.mov(rax, qword_ptr(0x40_0ff8)).unwrap();
        a.mov(qword_ptr(0x40_0ff0), rax).unwrap();
        a.hlt().unwrap();
    });
    assert_eq!(m.run(), VcpuExit::Halted);
    let s = m.state();
    assert_eq!(s.regs.rax, 0x1122_3344_5566_7788);
    assert_eq!(s.regs.rbx, 0b011, "present, write, supervisor");
    assert_eq!(s.regs.rcx, 0x40_0ff0);
    assert_eq!(s.sregs.cr2, 0x40_0ff0);

    // An access crossing into the non-present page faults on the second page.
    m.set_state(CODE + 0x100);
    m.assemble(CODE + 0x100, |a| {
        a.mov(rax, qword_ptr(0x40_0ffc)).unwrap();
        a.hlt().unwrap();
    });
    assert_eq!(m.run(), VcpuExit::Halted);
    let s = m.state();
    assert_eq!(s.regs.rbx, 0b000);
    assert_eq!(s.regs.rcx, 0x40_1000);
}

#[test]
fn user_mode_round_trip_with_syscall_and_interrupt() {
    let mut m = Machine::new(16 << 20);
    let user = CODE + 0x2000;
    let syscall_entry = CODE + 0x3000;
    let int_handler = CODE + 0x4000;
    m.set_gate(0x80, int_handler, 0, 3);
    // Kernel: STAR/LSTAR, then iretq to user mode.
    m.assemble(CODE, |a| {
        let star = (u64::from(USER_DS - 8 - 3) << 48) | (u64::from(KERNEL_CS) << 32);
        write_msr(a, 0xc000_0081, star);
        write_msr(a, 0xc000_0082, syscall_entry);
        a.push(i32::from(USER_DS)).unwrap();
        a.push(0x7_0000i32).unwrap();
        a.push(0x202i32).unwrap();
        a.push(i32::from(USER_CS)).unwrap();
        a.push(user as i32).unwrap();
        a.iretq().unwrap();
    });
    // User: int 0x80, then syscall.
    m.assemble(user, |a| {
        a.mov(eax, 7).unwrap();
        a.int(0x80).unwrap();
        a.syscall().unwrap();
        a.hlt().unwrap(); // #GP at CPL 3 (no handler: triple fault if reached)
    });
    // int 0x80 handler: records CPL of the interrupted context and the stack it used.
    m.assemble(int_handler, |a| {
        a.mov(rbx, qword_ptr(rsp + 8)).unwrap(); // CS
        a.mov(rdx, rsp).unwrap();
        a.iretq().unwrap();
    });
    // syscall: check we are at CPL 0, then halt.
    m.assemble(syscall_entry, |a| {
        a.mov(rsi, rcx).unwrap();
        a.mov(rdi, r11).unwrap();
        a.cli().unwrap();
        a.hlt().unwrap();
    });
    assert_eq!(m.run(), VcpuExit::Halted);
    let s = m.state();
    assert_eq!(s.regs.rbx, u64::from(USER_CS));
    assert_eq!(
        s.regs.rdx,
        KERNEL_STACK_TOP - 40,
        "interrupt from CPL 3 switches to RSP0"
    );
    assert_eq!(
        s.regs.rsi,
        user + 5 + 2 + 2,
        "RCX = return address after syscall"
    );
    assert_eq!(s.regs.rdi & 0x200, 0x200, "R11 = RFLAGS with IF");
    assert_eq!(s.sregs.cs.selector, KERNEL_CS);
    assert_eq!(s.regs.rsp, 0x7_0000, "SYSCALL keeps the user stack");
}

#[test]
fn ist_stack_and_double_fault_and_triple_fault() {
    let mut m = Machine::new(16 << 20);
    let df_handler = CODE + 0x1000;
    m.set_gate(8, df_handler, 1, 0);
    m.assemble(df_handler, |a| {
        a.mov(rbx, rsp).unwrap();
        a.hlt().unwrap();
    });
    // #GP gate not present: #NP while delivering #GP -> double fault on IST1.
    m.assemble(CODE, |a| {
        a.mov(rax, 0x8000_0000_0000_0000u64).unwrap();
        a.mov(rax, qword_ptr(rax)).unwrap(); // non-canonical: #GP
        a.hlt().unwrap();
    });
    assert_eq!(m.run(), VcpuExit::Halted);
    let s = m.state();
    assert_eq!(
        s.regs.rbx,
        IST_STACK_TOP - 48,
        "#DF pushes an error code on IST1"
    );

    // With an empty IDT the first fault becomes a triple fault.
    m.modify_state(|s| {
        s.sregs.idt.limit = 0;
        s.regs.rip = CODE;
    });
    assert_eq!(m.run(), VcpuExit::TripleFault);
}

#[test]
fn self_modifying_code_through_an_alias_mapping() {
    let mut m = Machine::new(16 << 20);
    let code_page = 0x40_0000u64;
    let alias = 0x50_0000u64;
    m.map_page(alias, code_page, 0x3);
    m.assemble(code_page, |a| {
        a.mov(eax, 1).unwrap();
        a.ret().unwrap();
    });
    m.assemble(CODE, |a| {
        a.call(code_page).unwrap();
        a.mov(ebx, eax).unwrap();
        // Patch "mov eax, 1" into "mov eax, 2" through the alias.
        a.mov(byte_ptr(alias + 1), 2).unwrap();
        a.call(code_page).unwrap();
        a.hlt().unwrap();
    });
    assert_eq!(m.run(), VcpuExit::Halted);
    let s = m.state();
    assert_eq!(s.regs.rbx, 1);
    assert_eq!(s.regs.rax, 2);
}

#[test]
fn self_modifying_code_in_the_same_block() {
    let mut m = Machine::new(16 << 20);
    m.assemble(CODE, |a| {
        a.mov(byte_ptr(CODE + 0x20 + 1), 9).unwrap();
        a.nop().unwrap();
        a.nop().unwrap();
    });
    // At CODE+0x20: mov eax, 5; hlt — reached by falling through NOPs.
    let len = m.assemble(CODE, |a| {
        a.mov(byte_ptr(CODE + 0x20 + 1), 9).unwrap();
    });
    for i in len as u64..0x20 {
        m.write(CODE + i, &[0x90]);
    }
    m.assemble(CODE + 0x20, |a| {
        a.mov(eax, 5).unwrap();
        a.hlt().unwrap();
    });
    assert_eq!(m.run(), VcpuExit::Halted);
    assert_eq!(m.state().regs.rax, 9);
}

#[test]
fn garbage_code_ends_cleanly() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..200 {
        let mut m = Machine::new(16 << 20);
        let mut junk = vec![0u8; 4096];
        for b in junk.iter_mut() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            *b = seed as u8;
        }
        m.write(CODE, &junk);
        // Every vector points into the junk too.
        for v in 0..=255u8 {
            m.set_gate(v, CODE + u64::from(v) * 13, 0, 3);
        }
        let stopper = m.vcpu.stopper();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            stopper.stop();
        });
        match m.vcpu.run() {
            Ok(_) => {}
            Err(lodge_engine::EngineError::Guest { reason, .. }) => {
                assert!(!reason.is_empty(), "round {round}")
            }
            Err(e) => panic!("round {round}: unexpected error {e}"),
        }
        t.join().unwrap();
    }
}

#[test]
fn interrupt_lines_and_vcpus_are_validated() {
    let m = Machine::new(16 << 20);
    assert!(m.vm.interrupt_line(2).is_err());
    assert!(m.vm.interrupt_line(16).is_err());
    assert!(m.vm.interrupt_line(15).is_ok());
    assert!(m.vm.create_vcpu(0).is_err(), "one vCPU only");
    assert!(!m
        .vm
        .register_mmio_notifier(
            0xd000_0000,
            0,
            &vmm_sys_util::eventfd::EventFd::new(0).unwrap()
        )
        .unwrap());
}

/// Calls the function `code` (which returns EAX) `warm_up` times, so its blocks are decoded
/// (and linked), saves EAX in EBX and halts; meanwhile a device (another thread) writes
/// `patch` at `offset` into the function and raises an interrupt, after which the function
/// is called once more.
fn call_code_a_device_rewrites(code: &[u8], warm_up: usize, offset: u64, patch: &[u8]) -> CpuState {
    let mut m = Machine::new(16 << 20);
    let function = 0x40_0000u64;
    count_interrupts(&m, 0x35);
    m.write(function, code);
    m.assemble(CODE, |a| {
        init_pic(a, !0x20, 0xff);
        for _ in 0..warm_up {
            a.call(function).unwrap();
        }
        a.mov(ebx, eax).unwrap();
        a.sti().unwrap();
        a.hlt().unwrap();
        a.cli().unwrap();
        a.call(function).unwrap();
        a.hlt().unwrap();
    });
    let memory = m.memory.clone();
    let line = m.vm.interrupt_line(5).unwrap();
    let patch = patch.to_vec();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        use vm_memory::Bytes;
        memory
            .write_slice(&patch, vm_memory::GuestAddress(function + offset))
            .unwrap();
        line.trigger().unwrap();
    });
    assert_eq!(m.run(), VcpuExit::Halted);
    t.join().unwrap();
    m.state()
}

#[test]
fn code_rewritten_by_a_device_is_noticed_after_its_interrupt() {
    // mov eax, 1; ret  →  mov eax, 2; ret
    let s = call_code_a_device_rewrites(&[0xb8, 1, 0, 0, 0, 0xc3], 1, 0, &[0xb8, 2, 0, 0, 0]);
    assert_eq!(s.regs.rbx, 1);
    assert_eq!(s.regs.rax, 2, "the rewritten instruction ran");
}

#[test]
fn instructions_crossing_pages_follow_the_second_page_mapping() {
    let mut m = Machine::new(16 << 20);
    // A 10-byte `mov rax, imm64` at 0x40_0ffb spans pages 0x40_0000 and 0x40_1000.
    let start = 0x40_0ffbu64;
    m.map_page(0x40_0000, 0x40_0000, 0x7);
    m.map_page(0x40_1000, 0x60_0000, 0x7);
    // Both pages are in the page table map_page created first, at PT_POOL; 0x40_1000 is its
    // second entry.
    let pte = PT_POOL + 8;
    let mut code = vec![0x48, 0xb8];
    code.extend_from_slice(&0x1111_2222_3333_4444u64.to_le_bytes());
    code.push(0xc3); // ret
    m.write(start, &code[..5]);
    m.write(0x60_0000, &code[5..]);
    // Another tail on another physical page.
    let mut other = code.clone();
    other[2..10].copy_from_slice(&0x5555_6666_7777_8888u64.to_le_bytes());
    m.write(0x70_0000, &other[5..]);
    m.assemble(CODE, |a| {
        a.call(start).unwrap();
        a.mov(rbx, rax).unwrap();
        a.call(start).unwrap();
        a.mov(rcx, rax).unwrap();
        // Remap the second page, as a kernel would, and run it again.
        a.mov(rax, 0x70_0007u64).unwrap();
        a.mov(qword_ptr(pte), rax).unwrap();
        a.mov(rdi, 0x40_1000u64).unwrap();
        a.invlpg(byte_ptr(rdi)).unwrap();
        a.call(start).unwrap();
        a.hlt().unwrap();
    });
    assert_eq!(m.run(), VcpuExit::Halted);
    let s = m.state();
    assert_eq!(s.regs.rbx, 0x1111_2222_3333_4444);
    assert_eq!(s.regs.rcx, 0x1111_2222_3333_4444);
    // Head bytes 44 44 33 from the first page, tail 77 66 66 55 55 from the new second page.
    assert_eq!(s.regs.rax, 0x5555_6666_7733_4444);
}

#[test]
fn syscall_and_sysret_selectors_wrap_like_16_bit_registers() {
    let mut m = Machine::new(16 << 20);
    let entry = CODE + 0x1000;
    let user = CODE + 0x2000;
    let ud_handler = CODE + 0x3000;
    m.set_gate(6, ud_handler, 0, 0);
    // STAR[47:32] = 0xfffc (SYSCALL CS; SS = CS + 8 wraps to 4), STAR[63:48] = 0xfff8
    // (SYSRET CS = base + 16 wraps to 8, SS = base + 8 wraps to 0).
    m.assemble(CODE, |a| {
        write_msr(a, 0xc000_0081, 0xfff8_fffc_0000_0000);
        write_msr(a, 0xc000_0082, entry);
        a.syscall().unwrap();
    });
    m.assemble(entry, |a| {
        a.mov(r8d, cs).unwrap();
        a.mov(r9d, ss).unwrap();
        a.mov(rcx, user).unwrap();
        a.mov(r11d, 0x2).unwrap();
        a.sysretq().unwrap();
    });
    m.assemble(user, |a| {
        a.mov(r10d, cs).unwrap();
        a.mov(r12d, ss).unwrap();
        a.ud2().unwrap();
    });
    m.assemble(ud_handler, |a| {
        a.hlt().unwrap();
    });
    assert_eq!(m.run(), VcpuExit::Halted);
    let s = m.state();
    assert_eq!(s.regs.r8, 0xfffc, "SYSCALL CS");
    assert_eq!(s.regs.r9, 0x0004, "SYSCALL SS = CS + 8, 16-bit");
    assert_eq!(s.regs.r10, 0x000b, "SYSRET CS = base + 16, 16-bit, RPL 3");
    assert_eq!(s.regs.r12, 0x0003, "SYSRET SS = base + 8, 16-bit, RPL 3");
}

#[test]
fn ltr_reads_a_descriptor_wrapping_around_the_address_space() {
    let mut m = Machine::new(16 << 20);
    // Map the last linear page (0xffff_ffff_ffff_f000) to physical 0x31_0000.
    let (pdpt, pd, pt, top) = (0x30_0000u64, 0x30_1000u64, 0x30_2000u64, 0x31_0000u64);
    m.write_u64(PML4 + 511 * 8, pdpt | 3);
    m.write_u64(pdpt + 511 * 8, pd | 3);
    m.write_u64(pd + 511 * 8, pt | 3);
    m.write_u64(pt + 511 * 8, top | 3);
    // A GDT based so that selector 8's 16-byte TSS descriptor starts 5 bytes before the
    // end of the address space and continues at linear (and physical) 0.
    let gdt_base = 0xffff_ffff_ffff_fff3u64;
    let mut tss = [0u8; 16];
    tss[..2].copy_from_slice(&0x67u16.to_le_bytes());
    tss[2..5].copy_from_slice(&(TSS as u32).to_le_bytes()[..3]);
    tss[5] = 0x89; // present, available 64-bit TSS
    m.write(top + 0xffb, &tss[..5]);
    m.write(0, &tss[5..]);
    let gdtr = 0x20000u64;
    m.write(gdtr, &23u16.to_le_bytes());
    m.write_u64(gdtr + 2, gdt_base);
    m.assemble(CODE, |a| {
        a.lgdt(ptr(gdtr)).unwrap();
        a.mov(ax, 8u32).unwrap();
        a.ltr(ax).unwrap();
        a.hlt().unwrap();
    });
    assert_eq!(m.run(), VcpuExit::Halted);
    let s = m.state();
    assert_eq!(s.sregs.tr.selector, 8);
    assert_eq!(s.sregs.tr.base, TSS);
    assert_eq!(s.sregs.tr.type_, 0xb);
    assert_eq!(
        m.read(0, 1)[0],
        0x8b,
        "busy bit set in the byte at linear 0"
    );
}

#[test]
fn far_transfers_with_16_bit_operand_size() {
    let mut m = Machine::new(16 << 20);
    // 16-bit operand size truncates offsets to 16 bits: everything runs below 64 KiB.
    let (low_code, jmp_target, call_target, pointers) = (0xe000u64, 0xe100u64, 0xe300u64, 0xe200);
    // IRETW pops five 16-bit words (IP, CS, FLAGS, SP, SS), in 64-bit mode too.
    let frame = 0xe7f6u64;
    for (i, word) in [low_code as u16, KERNEL_CS, 0x2, 0xe800, KERNEL_DS]
        .iter()
        .enumerate()
    {
        m.write(frame + 2 * i as u64, &word.to_le_bytes());
    }
    // m16:16 far pointers: offset, then selector.
    m.write(pointers, &[0x00, 0xe1, 0x10, 0x00]);
    m.write(pointers + 0x10, &[0x00, 0xe3, 0x10, 0x00]);
    m.assemble(CODE, |a| {
        a.mov(rsp, frame).unwrap();
        a.iret().unwrap();
    });
    m.assemble(low_code, |a| {
        a.mov(rbx, rsp).unwrap();
        // jmp far word [0xe200]
        a.db(&[0x66, 0xff, 0x2c, 0x25, 0x00, 0xe2, 0x00, 0x00])
            .unwrap();
    });
    m.assemble(jmp_target, |a| {
        // call far word [0xe210]
        a.db(&[0x66, 0xff, 0x1c, 0x25, 0x10, 0xe2, 0x00, 0x00])
            .unwrap();
        a.mov(rsi, rsp).unwrap();
        a.hlt().unwrap();
    });
    m.assemble(call_target, |a| {
        a.mov(rdx, rsp).unwrap();
        a.mov(rcx, qword_ptr(rsp)).unwrap();
        // retf with 16-bit operand size
        a.db(&[0x66, 0xcb]).unwrap();
    });
    assert_eq!(m.run(), VcpuExit::Halted);
    let s = m.state();
    assert_eq!(s.regs.rbx, 0xe800, "IRETW popped a 16-bit SP");
    assert_eq!(s.regs.rdx, 0xe800 - 4, "CALL FAR m16:16 pushed two words");
    assert_eq!(
        s.regs.rcx & 0xffff_ffff,
        (u64::from(KERNEL_CS) << 16) | (jmp_target + 8),
        "return IP, then CS"
    );
    assert_eq!(s.regs.rsi, 0xe800, "RETF popped two words");
    assert_eq!(s.regs.rip, jmp_target + 8 + 3 + 1);
}

#[test]
fn far_jump_and_return_to_non_canonical_offsets_fault_at_the_instruction() {
    let mut m = Machine::new(16 << 20);
    let handler = CODE + 0x1000;
    m.set_gate(13, handler, 0, 0);
    m.assemble(handler, |a| {
        a.pop(rbx).unwrap(); // error code
        a.pop(rcx).unwrap(); // faulting RIP
        a.hlt().unwrap();
    });
    let pointer = 0x20000u64;
    m.write_u64(pointer, 0x8000_0000_0000_0000);
    m.write(pointer + 8, &KERNEL_CS.to_le_bytes());
    m.assemble(CODE, |a| {
        a.jmp(tword_ptr(pointer)).unwrap();
    });
    assert_eq!(m.run(), VcpuExit::Halted);
    let s = m.state();
    assert_eq!((s.regs.rbx, s.regs.rcx), (0, CODE), "#GP(0) at the JMP FAR");

    m.set_state(CODE + 0x100);
    m.assemble(CODE + 0x100, |a| {
        a.push(i32::from(KERNEL_CS)).unwrap();
        a.mov(rax, 0x8000_0000_0000_0000u64).unwrap();
        a.push(rax).unwrap();
        a.retf().unwrap();
    });
    assert_eq!(m.run(), VcpuExit::Halted);
    let s = m.state();
    assert_eq!(
        (s.regs.rbx, s.regs.rcx),
        (0, CODE + 0x100 + 2 + 10 + 1),
        "#GP(0) at the RETF"
    );
}

#[test]
fn relative_branches_to_non_canonical_targets_fault_at_the_branch() {
    let mut m = Machine::new(16 << 20);
    // The upper half's first 512 GiB alias the identity map, so code runs just above the
    // non-canonical hole and short branches back reach into it.
    let upper = 0xffff_8000_0000_0000u64;
    let hole = upper - 0x40;
    m.write_u64(PML4 + 256 * 8, PDPT | 7);
    let handler = CODE + 0x1000;
    m.set_gate(13, handler, 0, 0);
    m.assemble(handler, |a| {
        a.pop(rbx).unwrap(); // error code
        a.pop(rdx).unwrap(); // faulting RIP
        a.pop(rax).unwrap(); // CS
        a.pop(rax).unwrap(); // RFLAGS
        a.pop(rsi).unwrap(); // RSP at the fault
        a.hlt().unwrap();
    });
    let start = upper + 0x10;
    /// Assembles a case's code, given the non-canonical target.
    type Code = fn(&mut CodeAssembler, u64);
    // Each case: the code, and the offset of the branch that must fault (None: no fault).
    let cases: [(&str, Code, Option<u64>); 5] = [
        ("jmp", |a, hole| a.jmp(hole).unwrap(), Some(0)),
        ("call", |a, hole| a.call(hole).unwrap(), Some(0)),
        (
            "taken je",
            |a, hole| {
                a.xor(eax, eax).unwrap();
                a.je(hole).unwrap();
            },
            Some(2),
        ),
        (
            "taken loop",
            |a, hole| {
                a.mov(ecx, 5).unwrap();
                a.loop_(hole).unwrap();
            },
            Some(5),
        ),
        (
            "not-taken je",
            |a, hole| {
                a.mov(eax, 1).unwrap();
                a.test(eax, eax).unwrap();
                a.je(hole).unwrap();
                a.mov(ecx, 0x55).unwrap();
                a.hlt().unwrap();
            },
            None,
        ),
    ];
    for (name, code, fault_at) in cases {
        m.set_state(start);
        m.modify_state(|s| {
            s.regs.rsp = STACK_TOP;
            s.regs.rbx = u64::MAX;
        });
        // Assembled for its upper-half address, stored at the physical address it aliases.
        let mut a = CodeAssembler::new(64).unwrap();
        code(&mut a, hole);
        m.write(start - upper, &a.assemble(start).unwrap());
        assert_eq!(m.run(), VcpuExit::Halted, "{name}");
        let s = m.state();
        match fault_at {
            Some(offset) => {
                assert_eq!(
                    (s.regs.rbx, s.regs.rdx),
                    (0, start + offset),
                    "{name}: #GP(0) at the branch"
                );
                assert_eq!(s.regs.rsi, STACK_TOP, "{name}: nothing pushed");
                if name == "taken loop" {
                    assert_eq!(s.regs.rcx, 5, "{name}: the count is unchanged");
                }
            }
            None => assert_eq!((s.regs.rbx, s.regs.rcx), (u64::MAX, 0x55), "{name}: ran on"),
        }
    }
}

#[test]
fn code_overwritten_by_an_exception_frame_is_retranslated() {
    let mut m = Machine::new(16 << 20);
    // The #UD handler at `handler` first runs as a function (`mov ecx, 7; ret`), so its
    // code is decoded. Then a UD2 at 0x10_26eb pushes its frame over that code: the faulting
    // RIP (bytes eb 26 10 00 ..) becomes `jmp $+0x28`, past the 40-byte frame, where
    // `mov ebx, 2; hlt` waits. The stale decoded `mov ecx, 7` must not run again.
    let handler = 0x40_0008u64;
    let ud2_at = 0x10_26ebu64;
    m.set_gate(6, handler, 0, 0);
    m.assemble(handler, |a| {
        a.mov(ecx, 7).unwrap();
        a.ret().unwrap();
    });
    m.assemble(handler + 0x28, |a| {
        a.mov(ebx, 2).unwrap();
        a.hlt().unwrap();
    });
    m.assemble(ud2_at, |a| {
        a.ud2().unwrap();
    });
    m.assemble(CODE, |a| {
        a.call(handler).unwrap();
        a.xor(ecx, ecx).unwrap();
        // The frame goes at (RSP & !15) - 40 = `handler`.
        a.mov(rsp, handler + 40).unwrap();
        a.jmp(ud2_at).unwrap();
    });
    assert_eq!(m.run(), VcpuExit::Halted);
    assert_eq!(
        m.read(handler, 2),
        [0xeb, 0x26],
        "the frame holds the faulting RIP"
    );
    let s = m.state();
    assert_eq!(s.regs.rcx, 0, "the stale decoded handler did not run");
    assert_eq!(s.regs.rbx, 2, "the handler's code as the frame left it ran");
    assert_eq!(s.regs.rip, handler + 0x28 + 6);
}

#[test]
fn non_canonical_stack_accesses_raise_ss_and_other_operands_gp() {
    let mut m = Machine::new(16 << 20);
    // #SS and #GP on IST1, so a bad RSP cannot break delivery; each records its vector.
    for (vector, handler) in [(12u8, CODE + 0x1000), (13, CODE + 0x1100)] {
        m.set_gate(vector, handler, 1, 0);
        m.assemble(handler, |a| {
            a.mov(ebx, u32::from(vector)).unwrap();
            a.hlt().unwrap();
        });
    }
    let bad = 0x8000_0000_0000_0000u64;
    type Case = fn(&mut CodeAssembler);
    let cases: [(&str, Case, u64); 7] = [
        ("push m64", |a| a.push(qword_ptr(rax)).unwrap(), 13),
        ("pop m64", |a| a.pop(qword_ptr(rax)).unwrap(), 13),
        ("call m64", |a| a.call(qword_ptr(rax)).unwrap(), 13),
        (
            "mov r64, [rax]",
            |a| a.mov(rcx, qword_ptr(rax)).unwrap(),
            13,
        ),
        (
            "mov r64, [rbp]",
            |a| a.mov(rcx, qword_ptr(rbp)).unwrap(),
            12,
        ),
        ("push r64", |a| a.push(rcx).unwrap(), 12),
        ("ret", |a| a.ret().unwrap(), 12),
    ];
    for (name, case, vector) in cases {
        let start = CODE + 0x200;
        m.set_state(start);
        let setup = m.assemble(start, |a| {
            a.mov(rax, bad).unwrap();
            a.mov(rbp, bad).unwrap();
            if vector == 12 && !name.contains("rbp") {
                a.mov(rsp, bad).unwrap();
            }
        });
        let fault_at = start + setup as u64;
        m.assemble(fault_at, |a| {
            case(a);
            a.hlt().unwrap();
        });
        assert_eq!(m.run(), VcpuExit::Halted, "{name}");
        let s = m.state();
        assert_eq!(s.regs.rbx, vector, "{name}");
        assert_eq!(
            m.read_u64(IST_STACK_TOP - 40),
            fault_at,
            "{name}: RIP of the faulting instruction"
        );
    }
}

#[test]
fn an_instruction_crossing_into_mmio_is_not_fetched_from_the_device() {
    let mut m = Machine::new(16 << 20);
    let dev = m.add_mmio(0xd000_0000, 0x1000);
    m.map_page(0x40_0000, 0x40_0000, 0x3);
    m.map_page(0x40_1000, 0xd000_0000, 0x3);
    // The first 5 bytes of a 10-byte `mov rax, imm64`; the rest would come from the device.
    m.write(0x40_0ffb, &[0x48, 0xb8, 0x11, 0x22, 0x33]);
    m.assemble(CODE, |a| {
        a.jmp(0x40_0ffbu64).unwrap();
    });
    match m.vcpu.run() {
        Err(lodge_engine::EngineError::Guest { reason, .. }) => {
            assert!(reason.contains("outside RAM"), "{reason}")
        }
        other => panic!("expected an engine failure, got {other:?}"),
    }
    assert_eq!(dev.lock().unwrap().reads, 0, "no device register was read");
}

#[test]
fn a_page_fault_reading_the_gdt_during_delivery_is_a_page_fault() {
    let mut m = Machine::new(16 << 20);
    // The GDT moves to 0x40_0000; its second page (holding selector 0x1000) is not present.
    let gdt = 0x40_0000u64;
    m.map_page(gdt, gdt, 0x3);
    m.map_page(gdt + 0x1000, gdt + 0x1000, 0x0);
    let entries = m.read(GDT, 9 * 8);
    m.write(gdt, &entries);
    let gdtr = 0x20000u64;
    m.write(gdtr, &0x1007u16.to_le_bytes());
    m.write_u64(gdtr + 2, gdt);
    // #UD's gate names code selector 0x1000; #PF's is the usual kernel code segment.
    let (ud_handler, pf_handler) = (CODE + 0x1000, CODE + 0x1100);
    m.set_gate(6, ud_handler, 0, 0);
    let gate = IDT + 6 * 16;
    m.write(gate + 2, &0x1000u16.to_le_bytes());
    m.set_gate(14, pf_handler, 0, 0);
    m.assemble(pf_handler, |a| {
        a.pop(rbx).unwrap(); // error code
        a.pop(rdx).unwrap(); // RIP
        a.mov(rcx, cr2).unwrap();
        a.hlt().unwrap();
    });
    let ud2_at = m.assemble(CODE, |a| {
        a.lgdt(ptr(gdtr)).unwrap();
    }) as u64
        + CODE;
    m.assemble(ud2_at, |a| {
        a.ud2().unwrap();
    });
    assert_eq!(m.run(), VcpuExit::Halted);
    let s = m.state();
    assert_eq!(s.regs.rcx, gdt + 0x1000, "CR2: the descriptor's address");
    assert_eq!(s.regs.rbx, 0, "not present, supervisor read");
    assert_eq!(s.regs.rdx, ud2_at, "the #UD's instruction");
}

#[test]
fn wait_raises_nm_only_with_cr0_mp_and_ts() {
    let mut m = Machine::new(16 << 20);
    let handler = CODE + 0x1000;
    m.set_gate(7, handler, 0, 0);
    m.assemble(handler, |a| {
        a.pop(rbx).unwrap(); // RIP of the faulting instruction
        a.hlt().unwrap();
    });
    // CR0 as the machine sets it (PE, MP, ET, NE, WP, PG) with TS added, then without MP.
    for (control, faults) in [(0x8005_003bu64, true), (0x8005_0039, false)] {
        m.set_state(CODE);
        m.modify_state(|s| s.sregs.cr0 = control);
        m.assemble(CODE, |a| {
            a.xor(ebx, ebx).unwrap();
            a.wait().unwrap();
            a.hlt().unwrap();
        });
        assert_eq!(m.run(), VcpuExit::Halted);
        let expected = if faults { CODE + 2 } else { 0 };
        assert_eq!(m.state().regs.rbx, expected, "CR0 {control:#x}");
    }
    // Other x87 instructions fault on TS alone.
    m.set_state(CODE);
    m.modify_state(|s| s.sregs.cr0 = 0x8005_0039);
    m.assemble(CODE, |a| {
        a.xor(ebx, ebx).unwrap();
        a.fld1().unwrap();
        a.hlt().unwrap();
    });
    assert_eq!(m.run(), VcpuExit::Halted);
    assert_eq!(m.state().regs.rbx, CODE + 2, "FLD1 with TS");
}

#[test]
fn far_transfers_to_32_bit_code_raise_gp_instead_of_ending_the_vm() {
    let mut m = Machine::new(16 << 20);
    let handler = CODE + 0x1000;
    m.set_gate(13, handler, 0, 0);
    m.assemble(handler, |a| {
        a.pop(rbx).unwrap(); // error code
        a.pop(rcx).unwrap(); // faulting RIP
        a.hlt().unwrap();
    });
    // Selector 0x08 is 32-bit kernel code, 0x23 32-bit user code (as in Linux's GDT).
    let pointer = 0x20000u64;
    m.write_u64(pointer, CODE + 0x100);
    m.write(pointer + 8, &0x08u16.to_le_bytes());
    m.assemble(CODE, |a| {
        a.jmp(tword_ptr(pointer)).unwrap();
    });
    assert_eq!(m.run(), VcpuExit::Halted);
    let s = m.state();
    assert_eq!((s.regs.rbx, s.regs.rcx), (0x08, CODE), "JMP FAR");

    // A user process returning to 32-bit user code with IRETQ.
    let user = CODE + 0x2000;
    m.set_state(CODE);
    m.assemble(CODE, |a| {
        a.push(i32::from(USER_DS)).unwrap();
        a.push(0x7_0000i32).unwrap();
        a.push(0x2i32).unwrap();
        a.push(i32::from(USER_CS)).unwrap();
        a.push(user as i32).unwrap();
        a.iretq().unwrap();
    });
    m.assemble(user, |a| {
        a.push(i32::from(USER_DS)).unwrap();
        a.push(0x7_0000i32).unwrap();
        a.push(0x2i32).unwrap();
        a.push(0x23i32).unwrap();
        a.push(user as i32).unwrap();
        a.iretq().unwrap();
    });
    assert_eq!(m.run(), VcpuExit::Halted);
    let s = m.state();
    assert_eq!(
        (s.regs.rbx, s.regs.rcx),
        (0x20, user + 2 + 5 + 2 + 2 + 5),
        "IRETQ from CPL 3"
    );
}

/// Assembles `build`'s code for linear address `linear` and writes it at physical `phys`.
fn assemble_at(m: &Machine, linear: u64, phys: u64, build: impl FnOnce(&mut CodeAssembler)) {
    let mut a = CodeAssembler::new(64).unwrap();
    build(&mut a);
    m.write(phys, &a.assemble(linear).unwrap());
}

/// A loop whose blocks link to each other remaps its own page on the last round, by INVLPG
/// or by reloading CR3: the block after the remapping must come from the new page.
fn remapping_inside_a_linked_loop(reload_cr3: bool) {
    let mut m = Machine::new(16 << 20);
    let linear = 0x40_0000u64;
    let (old, new) = (0x60_0000u64, 0x70_0000u64);
    m.map_page(linear, old, 0x3);
    // The first page table map_page made; `linear` is its first entry.
    let pte = PT_POOL;
    for (phys, value) in [(old, 1u32), (new, 2)] {
        assemble_at(&m, linear, phys, |a| {
            let mut top = a.create_label();
            a.set_label(&mut top).unwrap();
            a.cmp(ecx, 1).unwrap();
            a.cmove(rsi, rdx).unwrap();
            a.mov(qword_ptr(r8), rsi).unwrap();
            if reload_cr3 {
                a.mov(rax, cr3).unwrap();
                a.mov(cr3, rax).unwrap();
            } else {
                a.invlpg(byte_ptr(rdi)).unwrap();
            }
            a.mov(eax, value).unwrap();
            a.dec(ecx).unwrap();
            a.jnz(top).unwrap();
            a.ret().unwrap();
        });
    }
    m.assemble(CODE, |a| {
        a.mov(ecx, 5).unwrap();
        a.mov(rsi, old | 3).unwrap();
        a.mov(rdx, new | 3).unwrap();
        a.mov(r8, pte).unwrap();
        a.mov(rdi, linear).unwrap();
        a.call(linear).unwrap();
        a.hlt().unwrap();
    });
    assert_eq!(m.run(), VcpuExit::Halted);
    assert_eq!(m.state().regs.rax, 2, "the remapped page's code ran");
}

#[test]
fn linked_blocks_follow_an_invlpg_remapping() {
    remapping_inside_a_linked_loop(false);
}

#[test]
fn linked_blocks_follow_a_cr3_reload_remapping() {
    remapping_inside_a_linked_loop(true);
}

#[test]
fn linked_blocks_recheck_the_privilege() {
    let mut m = Machine::new(16 << 20);
    // A supervisor-only page: IRETQ there, then code that counts the rounds and jumps back.
    let page = 0x40_0000u64;
    m.map_page(page, page, 0x3);
    let after_iret = page + 2;
    m.assemble(page, |a| {
        a.iretq().unwrap();
        a.inc(ebx).unwrap();
        a.jmp(r12).unwrap();
    });
    assert_eq!(m.read(page, 2), [0x48, 0xcf], "IRETQ is two bytes");
    let handler = CODE + 0x1000;
    m.set_gate(14, handler, 0, 0);
    m.assemble(handler, |a| {
        a.pop(rdx).unwrap(); // error code
        a.mov(rcx, qword_ptr(rsp)).unwrap(); // RIP
        a.mov(r9, qword_ptr(rsp + 8)).unwrap(); // CS
        a.hlt().unwrap();
    });
    // Two rounds at CPL 0 (linking IRETQ's block to the next), then one to CPL 3 at the
    // same address, which must fault: the page is not user-accessible.
    let rounds = [CODE, CODE + 0x100, CODE + 0x200];
    for (i, &at) in rounds.iter().enumerate() {
        let user = i == 2;
        m.assemble(at, |a| {
            if i == 0 {
                a.xor(ebx, ebx).unwrap();
            }
            if user {
                a.push(i32::from(USER_DS)).unwrap();
                a.push(0x7_0000i32).unwrap();
                a.push(2i32).unwrap();
                a.push(i32::from(USER_CS)).unwrap();
            } else {
                a.mov(r12, rounds[i + 1]).unwrap();
                a.mov(rax, rsp).unwrap();
                a.push(i32::from(KERNEL_DS)).unwrap();
                a.push(rax).unwrap();
                a.push(2i32).unwrap();
                a.push(i32::from(KERNEL_CS)).unwrap();
            }
            a.push(after_iret as i32).unwrap();
            a.mov(rax, page).unwrap();
            a.jmp(rax).unwrap();
        });
    }
    assert_eq!(m.run(), VcpuExit::Halted);
    let s = m.state();
    assert_eq!(s.regs.rbx, 2, "both supervisor rounds ran");
    assert_eq!(
        s.regs.rdx, 0x15,
        "user instruction fetch from a present page"
    );
    assert_eq!(s.regs.rcx, after_iret);
    assert_eq!(s.regs.r9, u64::from(USER_CS));
}

#[test]
fn linked_blocks_see_code_written_through_an_alias() {
    let mut m = Machine::new(16 << 20);
    let page = 0x40_0000u64;
    let alias = 0x50_0000u64;
    m.map_page(alias, page, 0x3);
    // jmp to the next instruction (a block of its own, linked to the next); mov eax, 1; ret
    m.write(page, &[0xeb, 0x00, 0xb8, 1, 0, 0, 0, 0xc3]);
    m.assemble(CODE, |a| {
        let mut top = a.create_label();
        a.mov(ecx, 4).unwrap();
        a.xor(ebx, ebx).unwrap();
        a.set_label(&mut top).unwrap();
        a.call(page).unwrap();
        a.add(ebx, eax).unwrap();
        a.inc(byte_ptr(alias + 3)).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(top).unwrap();
        a.hlt().unwrap();
    });
    assert_eq!(m.run(), VcpuExit::Halted);
    assert_eq!(m.state().regs.rbx, 1 + 2 + 3 + 4);
}

#[test]
fn linked_blocks_see_code_rewritten_by_a_device() {
    // jmp to the next instruction (a block of its own, linked to the next); mov eax, 1; ret.
    // Two calls make the link; the device rewrites only the second block.
    let s = call_code_a_device_rewrites(&[0xeb, 0x00, 0xb8, 1, 0, 0, 0, 0xc3], 2, 3, &[2]);
    assert_eq!(s.regs.rbx, 1);
    assert_eq!(s.regs.rax, 2, "the rewritten block ran");
}
