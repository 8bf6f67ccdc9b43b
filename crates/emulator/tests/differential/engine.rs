//! Runs one instruction in the software engine, at CPL 3, at the same addresses the host
//! runner uses, and reports the same [`Outcome`].

use iced_x86::code_asm::*;
use lodge_engine::VcpuExit;

use super::common::*;
use super::native::*;

/// Kernel-side exception handlers: vector v records v and halts.
const HANDLERS: u64 = 0x20_0000;
const FAULT_MARK: u64 = 0x21_0000;
/// Where the engine's copy of the test ends (the HLT that #GPs at CPL 3).
const NO_FAULT: u64 = 0xff;

pub struct Engine {
    machine: Machine,
}

fn has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17)
}

impl Engine {
    pub fn new() -> Engine {
        let mut machine = Machine::new(512 << 20);
        // Only the test region is user-accessible, as on the host (where little else is
        // mapped near it); the kernel's tables, handlers and stacks are supervisor-only.
        for i in 0..512u64 {
            let pde = match i {
                0 | 1 => (i << 21) | 0x83,
                _ => 0,
            };
            machine.write_u64(PD + i * 8, pde);
        }
        machine.write_u64(PD + (REGION >> 21) * 8, (REGION & !0x1f_ffff) | 0x87);
        let mut page = REGION & !0x1f_ffff;
        while page < (REGION & !0x1f_ffff) + 0x20_0000 {
            let inside = (REGION..REGION + REGION_SIZE).contains(&page) && page != GUARD;
            machine.map_page(page, page, if inside { 0x7 } else { 0 });
            page += 0x1000;
        }
        for v in 0..32u8 {
            let handler = HANDLERS + u64::from(v) * 32;
            machine.assemble(handler, |a| {
                a.mov(byte_ptr(FAULT_MARK), u32::from(v)).unwrap();
                a.hlt().unwrap();
            });
            machine.set_gate(v, handler, 0, 0);
        }
        Engine { machine }
    }

    /// Runs `code` at `INSN` from `state`.
    pub fn run(&mut self, code: &[u8], state: &MachineState) -> Outcome {
        let m = &mut self.machine;
        // Prologue: load XMM and MXCSR (flags and GPRs come from the register state).
        let mut a = CodeAssembler::new(64).unwrap();
        a.fxrstor64(zmmword_ptr(FX_IN)).unwrap();
        a.jmp(INSN).unwrap();
        m.write(PROLOGUE, &a.assemble(PROLOGUE).unwrap());
        let end = INSN + code.len() as u64;
        let mut a = CodeAssembler::new(64).unwrap();
        a.fxsave64(zmmword_ptr(FX_OUT)).unwrap();
        let mut tail = a.assemble(end).unwrap();
        let hlt_at = end + tail.len() as u64;
        tail.push(0xf4);
        let mut body = code.to_vec();
        body.extend(tail);
        m.write(INSN, &body);
        m.write(FX_IN, &fx_image(state));
        m.write(DATA, &state.data);
        m.write(STACK, &state.stack);
        m.write(FAULT_MARK, &[NO_FAULT as u8]);

        m.set_state(PROLOGUE);
        m.modify_state(|s| {
            let r = &mut s.regs;
            [
                r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11,
                r.r12, r.r13, r.r14, r.r15,
            ] = state.regs;
            r.rflags = state.rflags;
            let user_code = lodge_engine::Segment {
                selector: USER_CS,
                dpl: 3,
                ..s.sregs.cs
            };
            let user_data = lodge_engine::Segment {
                selector: USER_DS,
                dpl: 3,
                ..s.sregs.ss
            };
            s.sregs.cs = user_code;
            s.sregs.ss = user_data;
            s.sregs.ds = user_data;
            s.sregs.es = user_data;
        });
        let exit = m.run();
        assert_eq!(exit, VcpuExit::Halted, "engine did not halt");
        let after = m.state();
        let vector = m.read(FAULT_MARK, 1)[0];
        // The handler ran on RSP0 with the interrupted frame on top.
        let frame_base = KERNEL_STACK_TOP - if has_error_code(vector) { 48 } else { 40 };
        let error_code = if has_error_code(vector) {
            m.read_u64(frame_base)
        } else {
            0
        };
        let frame = frame_base + if has_error_code(vector) { 8 } else { 0 };
        let rip = m.read_u64(frame);
        let rflags = m.read_u64(frame + 16);
        let saved_rsp = m.read_u64(frame + 24);
        let r = &after.regs;
        let mut regs = [
            r.rax, r.rcx, r.rdx, r.rbx, saved_rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ];
        if vector == 13 && rip == hlt_at {
            let mut out = MachineState {
                regs,
                rflags,
                xmm: [0; 16],
                mxcsr: 0,
                x87: X87State::default(),
                data: m.read(DATA, DATA_SIZE as usize),
                stack: m.read(STACK, STACK_SIZE as usize),
            };
            from_fx_image(&m.read(FX_OUT, 512), &mut out);
            return Outcome::Completed(Box::new(out));
        }
        assert!(
            vector < 32,
            "engine stopped without an exception (rip {:#x})",
            after.regs.rip
        );
        assert!(
            (INSN..hlt_at).contains(&rip) || rip == PROLOGUE || rip < INSN,
            "fault at {rip:#x} outside the test code"
        );
        regs[4] = saved_rsp;
        Outcome::Faulted {
            vector,
            error_code,
            address: after.sregs.cr2,
            regs,
        }
    }
}
