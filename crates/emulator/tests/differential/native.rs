//! Runs one instruction on the host CPU (at CPL 3, in this process) from a given register,
//! flag, XMM and memory state, and captures the resulting state or the exception it raised.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use iced_x86::code_asm::*;

/// The region both the host and the engine use, at the same addresses.
pub const REGION: u64 = 0x1000_0000;
pub const REGION_SIZE: u64 = 0x2_0000;
/// Stub prologue.
pub const PROLOGUE: u64 = REGION;
/// The instruction under test.
pub const INSN: u64 = REGION + 0x2000;
/// Where a faulting host run resumes.
const RECOVERY: u64 = REGION + 0x3000;
/// Data the memory operands point into, followed by an inaccessible guard page.
pub const DATA: u64 = REGION + 0x8000;
pub const DATA_SIZE: u64 = 0x2000;
pub const GUARD: u64 = DATA + DATA_SIZE;
/// Stack area.
pub const STACK: u64 = REGION + 0xc000;
pub const STACK_SIZE: u64 = 0x2000;
/// The state block.
pub const STATE: u64 = REGION + 0xf000;
const IN_REGS: u64 = STATE;
const IN_FLAGS: u64 = STATE + 128;
const OUT_REGS: u64 = STATE + 136;
const OUT_FLAGS: u64 = STATE + 264;
const HOST_RSP: u64 = STATE + 272;
const HOST_MXCSR: u64 = STATE + 840;
/// FXSAVE images (16-byte aligned) loaded before and stored after the instruction.
pub const FX_IN: u64 = STATE + 0x400;
pub const FX_OUT: u64 = STATE + 0x600;

/// Everything an instruction reads or writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineState {
    pub regs: [u64; 16],
    pub rflags: u64,
    pub xmm: [u128; 16],
    pub mxcsr: u32,
    pub x87: X87State,
    pub data: Vec<u8>,
    pub stack: Vec<u8>,
}

/// x87 registers in FXSAVE terms.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct X87State {
    pub fcw: u16,
    pub fsw: u16,
    /// Abridged tags: bit i = physical register i holds a value.
    pub ftw: u8,
    /// ST(0)..ST(7) (stack order, as FXSAVE stores them).
    pub st: [[u8; 10]; 8],
}

/// The FXSAVE64 image of a state's x87/SSE part.
pub fn fx_image(state: &MachineState) -> [u8; 512] {
    let mut img = [0u8; 512];
    img[0..2].copy_from_slice(&state.x87.fcw.to_le_bytes());
    img[2..4].copy_from_slice(&state.x87.fsw.to_le_bytes());
    img[4] = state.x87.ftw;
    img[24..28].copy_from_slice(&state.mxcsr.to_le_bytes());
    img[28..32].copy_from_slice(&0xffffu32.to_le_bytes());
    for (i, st) in state.x87.st.iter().enumerate() {
        img[32 + i * 16..42 + i * 16].copy_from_slice(st);
    }
    for (i, x) in state.xmm.iter().enumerate() {
        img[160 + i * 16..176 + i * 16].copy_from_slice(&x.to_le_bytes());
    }
    img
}

/// Reads back what `fx_image` writes.
pub fn from_fx_image(img: &[u8], state: &mut MachineState) {
    state.x87.fcw = u16::from_le_bytes([img[0], img[1]]);
    state.x87.fsw = u16::from_le_bytes([img[2], img[3]]);
    state.x87.ftw = img[4];
    state.mxcsr = u32::from_le_bytes(img[24..28].try_into().unwrap());
    for i in 0..8 {
        state.x87.st[i].copy_from_slice(&img[32 + i * 16..42 + i * 16]);
    }
    for i in 0..16 {
        state.xmm[i] = u128::from_le_bytes(img[160 + i * 16..176 + i * 16].try_into().unwrap());
    }
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Completed(Box<MachineState>),
    /// Exception vector, error code (for #PF/#GP), registers at the fault.
    Faulted {
        vector: u8,
        error_code: u64,
        /// CR2 of a #PF.
        address: u64,
        regs: [u64; 16],
    },
}

static LOCK: Mutex<()> = Mutex::new(());

/// The host-side runner. Only one exists at a time (it owns a fixed address range).
pub struct Native {
    _guard: std::sync::MutexGuard<'static, ()>,
}

/// Set by the signal handler: [faulted, vector, error code, 16 registers, CR2].
static FAULT: [AtomicU64; 20] = [const { AtomicU64::new(0) }; 20];
const FAULT_CR2: usize = 19;

// ucontext gregs indices (x86-64 Linux).
const REG_R8: usize = 0;
const REG_RDI: usize = 8;
const REG_RSI: usize = 9;
const REG_RBP: usize = 10;
const REG_RBX: usize = 11;
const REG_RDX: usize = 12;
const REG_RAX: usize = 13;
const REG_RCX: usize = 14;
const REG_RSP: usize = 15;
const REG_RIP: usize = 16;
const REG_EFL: usize = 17;
const REG_ERR: usize = 19;
const REG_TRAPNO: usize = 20;
const REG_CR2: usize = 22;

extern "C" fn on_signal(
    signal: libc::c_int,
    _info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid ucontext_t for SA_SIGINFO handlers.
    let uc = unsafe { &mut *(context as *mut libc::ucontext_t) };
    let g = &mut uc.uc_mcontext.gregs;
    let rip = g[REG_RIP] as u64;
    if !(REGION..REGION + 0x4000).contains(&rip) {
        // Not ours: restore the default action and let the fault happen again.
        // SAFETY: resetting a signal disposition is async-signal-safe.
        unsafe { libc::signal(signal, libc::SIG_DFL) };
        return;
    }
    let regs = [
        g[REG_RAX],
        g[REG_RCX],
        g[REG_RDX],
        g[REG_RBX],
        g[REG_RSP],
        g[REG_RBP],
        g[REG_RSI],
        g[REG_RDI],
        g[REG_R8],
        g[REG_R8 + 1],
        g[REG_R8 + 2],
        g[REG_R8 + 3],
        g[REG_R8 + 4],
        g[REG_R8 + 5],
        g[REG_R8 + 6],
        g[REG_R8 + 7],
    ]
    .map(|v| v as u64);
    FAULT[1].store(g[REG_TRAPNO] as u64, Ordering::SeqCst);
    FAULT[2].store(g[REG_ERR] as u64, Ordering::SeqCst);
    FAULT[FAULT_CR2].store(g[REG_CR2] as u64, Ordering::SeqCst);
    for (slot, r) in FAULT[3..FAULT_CR2].iter().zip(regs) {
        slot.store(r, Ordering::SeqCst);
    }
    FAULT[0].store(1, Ordering::SeqCst);
    g[REG_RIP] = RECOVERY as i64;
    // Resume without single-stepping, alignment checks or a reversed direction.
    g[REG_EFL] &= !(0x100 | 0x400 | 0x4_0000);
}

fn write_bytes(addr: u64, bytes: &[u8]) {
    // SAFETY: callers only write inside the mapped region.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, bytes.len()) };
}

fn read_bytes(addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    // SAFETY: callers only read inside the mapped region.
    unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, v.as_mut_ptr(), len) };
    v
}

fn read_u64(addr: u64) -> u64 {
    u64::from_le_bytes(read_bytes(addr, 8).try_into().unwrap())
}

/// The code loading registers from the state block (ends by jumping to `INSN`).
fn prologue() -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    for r in [rbx, rbp, r12, r13, r14, r15] {
        a.push(r).unwrap();
    }
    a.stmxcsr(dword_ptr(HOST_MXCSR)).unwrap();
    a.mov(qword_ptr(HOST_RSP), rsp).unwrap();
    a.fxrstor64(zmmword_ptr(FX_IN)).unwrap();
    a.mov(rsp, IN_FLAGS).unwrap();
    a.popfq().unwrap();
    for (i, r) in GPRS.iter().enumerate() {
        if i != 4 {
            a.mov(*r, qword_ptr(IN_REGS + i as u64 * 8)).unwrap();
        }
    }
    a.mov(rsp, qword_ptr(IN_REGS + 32)).unwrap();
    a.jmp(INSN).unwrap();
    a.assemble(PROLOGUE).unwrap()
}

/// Stores registers, flags and XMM state back and returns to the caller.
fn epilogue(at: u64) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    for (i, r) in GPRS.iter().enumerate() {
        a.mov(qword_ptr(OUT_REGS + i as u64 * 8), *r).unwrap();
    }
    a.mov(rsp, OUT_FLAGS + 8).unwrap();
    a.pushfq().unwrap();
    a.fxsave64(zmmword_ptr(FX_OUT)).unwrap();
    restore_host(&mut a);
    a.assemble(at).unwrap()
}

fn restore_host(a: &mut CodeAssembler) {
    a.fninit().unwrap();
    a.ldmxcsr(dword_ptr(HOST_MXCSR)).unwrap();
    a.mov(rsp, qword_ptr(HOST_RSP)).unwrap();
    // Clean flags for Rust: no DF, AC or TF.
    a.push(0x202).unwrap();
    a.popfq().unwrap();
    for r in [r15, r14, r13, r12, rbp, rbx] {
        a.pop(r).unwrap();
    }
    a.ret().unwrap();
}

pub const GPRS: [AsmRegister64; 16] = [
    rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15,
];

impl Native {
    /// Maps the region (or returns why it cannot).
    pub fn new() -> Result<Native, String> {
        let guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        static MAPPED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
        MAPPED
            .get_or_init(|| {
                // SAFETY: mapping a fixed range we verified is free (MAP_FIXED_NOREPLACE).
                let p = unsafe {
                    libc::mmap(
                        REGION as *mut libc::c_void,
                        REGION_SIZE as usize,
                        libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                        -1,
                        0,
                    )
                };
                if p as u64 != REGION {
                    return Err(format!(
                        "cannot map {REGION:#x}: {}",
                        std::io::Error::last_os_error()
                    ));
                }
                // SAFETY: the guard page is inside our mapping.
                unsafe { libc::mprotect(GUARD as *mut libc::c_void, 0x1000, libc::PROT_NONE) };
                write_bytes(PROLOGUE, &prologue());
                let mut a = CodeAssembler::new(64).unwrap();
                restore_host(&mut a);
                write_bytes(RECOVERY, &a.assemble(RECOVERY).unwrap());
                for signal in [
                    libc::SIGSEGV,
                    libc::SIGBUS,
                    libc::SIGFPE,
                    libc::SIGILL,
                    libc::SIGTRAP,
                ] {
                    // SAFETY: installing a handler with a zeroed, filled-in sigaction.
                    unsafe {
                        let mut sa: libc::sigaction = std::mem::zeroed();
                        sa.sa_sigaction = on_signal as *const () as usize;
                        sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_NODEFER;
                        libc::sigaction(signal, &sa, std::ptr::null_mut());
                    }
                }
                Ok(())
            })
            .clone()?;
        thread_local! {
            static ALT_STACK: Vec<u8> = {
                let stack = vec![0u8; 256 * 1024];
                let alt = libc::stack_t { ss_sp: stack.as_ptr() as *mut libc::c_void, ss_flags: 0, ss_size: stack.len() };
                // SAFETY: the stack lives as long as the thread (thread-local).
                unsafe { libc::sigaltstack(&alt, std::ptr::null_mut()) };
                stack
            };
        }
        ALT_STACK.with(|s| assert!(!s.is_empty()));
        Ok(Native { _guard: guard })
    }

    /// Runs `code` (one instruction) at `INSN` from `state`.
    pub fn run(&mut self, code: &[u8], state: &MachineState) -> Outcome {
        let mut body = code.to_vec();
        body.extend(epilogue(INSN + code.len() as u64));
        write_bytes(INSN, &body);
        for (i, r) in state.regs.iter().enumerate() {
            write_bytes(IN_REGS + i as u64 * 8, &r.to_le_bytes());
        }
        write_bytes(IN_FLAGS, &state.rflags.to_le_bytes());
        write_bytes(FX_IN, &fx_image(state));
        write_bytes(DATA, &state.data);
        write_bytes(STACK, &state.stack);
        FAULT[0].store(0, Ordering::SeqCst);
        // SAFETY: the prologue is valid code that returns to us with callee-saved registers,
        // the stack pointer, MXCSR and DF restored; faults come back through RECOVERY.
        unsafe {
            let f: extern "C" fn() = std::mem::transmute(PROLOGUE as usize);
            f();
        }
        if FAULT[0].load(Ordering::SeqCst) != 0 {
            let mut regs = [0u64; 16];
            for (r, slot) in regs.iter_mut().zip(&FAULT[3..FAULT_CR2]) {
                *r = slot.load(Ordering::SeqCst);
            }
            return Outcome::Faulted {
                vector: FAULT[1].load(Ordering::SeqCst) as u8,
                error_code: FAULT[2].load(Ordering::SeqCst),
                address: FAULT[FAULT_CR2].load(Ordering::SeqCst),
                regs,
            };
        }
        let mut regs = [0u64; 16];
        for (i, r) in regs.iter_mut().enumerate() {
            *r = read_u64(OUT_REGS + i as u64 * 8);
        }
        let mut out = MachineState {
            regs,
            rflags: read_u64(OUT_FLAGS),
            xmm: [0; 16],
            mxcsr: 0,
            x87: X87State::default(),
            data: read_bytes(DATA, DATA_SIZE as usize),
            stack: read_bytes(STACK, STACK_SIZE as usize),
        };
        from_fx_image(&read_bytes(FX_OUT, 512), &mut out);
        Outcome::Completed(Box::new(out))
    }
}
