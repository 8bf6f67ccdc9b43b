//! A minimal long-mode machine for tests: identity-mapped memory, a Linux-like GDT, an IDT,
//! a TSS, and helpers to assemble code into it and run it through the public engine API.

#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use iced_x86::code_asm::{eax, ecx, edx, CodeAssembler};
use lodge_bus::{BusDevice, IoBus};
use lodge_emulator::EmulatorEngine;
use lodge_engine::{CpuState, DescriptorTable, Engine, Segment, Vcpu, VcpuExit, Vm, VmSpec};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const PML4: u64 = 0x1000;
pub const PDPT: u64 = 0x2000;
pub const PD: u64 = 0x3000;
pub const GDT: u64 = 0x4000;
pub const IDT: u64 = 0x5000;
pub const TSS: u64 = 0x6000;
/// Page tables for 4K mappings the tests add.
pub const PT_POOL: u64 = 0x8000;
pub const CODE: u64 = 0x10_0000;
pub const STACK_TOP: u64 = 0x8_0000;
pub const KERNEL_STACK_TOP: u64 = 0x9_0000;
pub const IST_STACK_TOP: u64 = 0xa_0000;

pub const KERNEL_CS: u16 = 0x10;
pub const KERNEL_DS: u16 = 0x18;
pub const USER_DS: u16 = 0x2b;
pub const USER_CS: u16 = 0x33;
pub const TSS_SELECTOR: u16 = 0x38;

/// Assembles a WRMSR of `value` to `msr` (clobbers EAX, ECX, EDX).
pub fn write_msr(a: &mut CodeAssembler, msr: u32, value: u64) {
    a.mov(ecx, msr).unwrap();
    a.mov(eax, value as u32).unwrap();
    a.mov(edx, (value >> 32) as u32).unwrap();
    a.wrmsr().unwrap();
}

/// Records port/MMIO writes, counts reads and answers them with a fixed pattern.
#[derive(Default)]
pub struct Recorder {
    pub writes: Vec<(u64, Vec<u8>)>,
    pub reads: usize,
    pub read_value: u8,
}

impl BusDevice for Recorder {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.reads += 1;
        for (i, b) in data.iter_mut().enumerate() {
            *b = self
                .read_value
                .wrapping_add(offset as u8)
                .wrapping_add(i as u8);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.writes.push((offset, data.to_vec()));
    }
}

pub struct Machine {
    pub memory: GuestMemoryMmap,
    pub io: Arc<IoBus>,
    pub vm: Arc<dyn Vm>,
    pub vcpu: Box<dyn Vcpu>,
    next_table: u64,
}

fn descriptor(base: u32, limit: u32, access: u8, flags: u8) -> u64 {
    (u64::from(limit) & 0xffff)
        | ((u64::from(base) & 0xff_ffff) << 16)
        | (u64::from(access) << 40)
        | ((u64::from(limit >> 16) & 0xf) << 48)
        | (u64::from(flags & 0xf) << 52)
        | ((u64::from(base) >> 24) << 56)
}

impl Machine {
    /// A machine with `size` bytes of RAM at 0 (at least 16 MiB), the first GiB identity
    /// mapped with 2 MiB user-accessible pages.
    pub fn new(size: usize) -> Self {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap();
        let io = Arc::new(IoBus::new());
        let vm = EmulatorEngine::new()
            .create_vm(VmSpec {
                memory: memory.clone(),
                vcpu_count: 1,
                io: io.clone(),
            })
            .unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let mut m = Machine {
            memory,
            io,
            vm,
            vcpu,
            next_table: PT_POOL,
        };
        m.write_u64(PML4, PDPT | 7);
        m.write_u64(PDPT, PD | 7);
        for i in 0..512u64 {
            m.write_u64(PD + i * 8, (i << 21) | 0x87);
        }
        let gdt = [
            0,
            descriptor(0, 0xfffff, 0x9b, 0xc),
            descriptor(0, 0xfffff, 0x9b, 0xa),
            descriptor(0, 0xfffff, 0x93, 0xc),
            descriptor(0, 0xfffff, 0xfb, 0xc),
            descriptor(0, 0xfffff, 0xf3, 0xc),
            descriptor(0, 0xfffff, 0xfb, 0xa),
            descriptor(TSS as u32, 0x67, 0x89, 0),
            0,
        ];
        for (i, d) in gdt.iter().enumerate() {
            m.write_u64(GDT + i as u64 * 8, *d);
        }
        // TSS: RSP0 and IST1.
        m.write_u64(TSS + 4, KERNEL_STACK_TOP);
        m.write_u64(TSS + 0x24, IST_STACK_TOP);
        m.set_state(CODE);
        m
    }

    /// Resets registers to 64-bit kernel mode at `rip` with the tables above loaded.
    pub fn set_state(&mut self, rip: u64) {
        let code = Segment::from_descriptor(KERNEL_CS, descriptor(0, 0xfffff, 0x9b, 0xa));
        let data = Segment::from_descriptor(KERNEL_DS, descriptor(0, 0xfffff, 0x93, 0xc));
        let mut tr = Segment::from_descriptor(TSS_SELECTOR, descriptor(TSS as u32, 0x67, 0x8b, 0));
        tr.type_ = 0xb;
        let mut state = CpuState::default();
        state.regs.rip = rip;
        state.regs.rsp = STACK_TOP;
        state.regs.rflags = 2;
        let s = &mut state.sregs;
        s.cs = code;
        s.ds = data;
        s.es = data;
        s.ss = data;
        s.fs = data;
        s.gs = data;
        s.tr = tr;
        s.ldt = Segment {
            unusable: true,
            ..Default::default()
        };
        s.gdt = DescriptorTable {
            base: GDT,
            limit: 9 * 8 - 1,
        };
        s.idt = DescriptorTable {
            base: IDT,
            limit: 256 * 16 - 1,
        };
        s.cr0 = 0x8005_0033;
        s.cr3 = PML4;
        s.cr4 = 0x6a0; // PAE, PGE, OSFXSR, OSXMMEXCPT
        s.efer = 0xd01; // SCE, LME, LMA, NXE
        self.vcpu.set_state(&state).unwrap();
    }

    pub fn state(&self) -> CpuState {
        self.vcpu.state().unwrap()
    }

    pub fn modify_state(&mut self, f: impl FnOnce(&mut CpuState)) {
        let mut s = self.state();
        f(&mut s);
        self.vcpu.set_state(&s).unwrap();
    }

    pub fn write(&self, addr: u64, data: &[u8]) {
        self.memory.write_slice(data, GuestAddress(addr)).unwrap();
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.memory.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    pub fn write_u64(&self, addr: u64, value: u64) {
        self.write(addr, &value.to_le_bytes());
    }

    pub fn read_u64(&self, addr: u64) -> u64 {
        u64::from_le_bytes(self.read(addr, 8).try_into().unwrap())
    }

    /// Assembles `build`'s code at `addr` and writes it there; returns its length.
    pub fn assemble(&self, addr: u64, build: impl FnOnce(&mut CodeAssembler)) -> usize {
        let mut a = CodeAssembler::new(64).unwrap();
        build(&mut a);
        let bytes = a.assemble(addr).unwrap();
        self.write(addr, &bytes);
        bytes.len()
    }

    /// Points IDT entry `vector` at `handler` (interrupt gate, kernel code).
    pub fn set_gate(&self, vector: u8, handler: u64, ist: u8, dpl: u8) {
        let low = (handler & 0xffff)
            | (u64::from(KERNEL_CS) << 16)
            | (u64::from(ist & 7) << 32)
            | (0xeu64 << 40)
            | (u64::from(dpl & 3) << 45)
            | (1 << 47)
            | ((handler >> 16) & 0xffff) << 48;
        self.write_u64(IDT + u64::from(vector) * 16, low);
        self.write_u64(IDT + u64::from(vector) * 16 + 8, handler >> 32);
    }

    /// Maps 4 KiB page `linear` to `phys` with PTE `flags` (bit 0 is present), splitting the
    /// 2 MiB identity page it falls in.
    pub fn map_page(&mut self, linear: u64, phys: u64, flags: u64) {
        assert!(linear < 1 << 30, "tests map within the first GiB");
        let pd_index = linear >> 21;
        let pde = self.read_u64(PD + pd_index * 8);
        let table = if pde & 0x80 != 0 {
            let table = self.next_table;
            self.next_table += 0x1000;
            for i in 0..512u64 {
                self.write_u64(
                    table + i * 8,
                    ((pde & !0x1f_ffff & !0x80) + (i << 12)) | (pde & 0xfff & !0x80),
                );
            }
            self.write_u64(PD + pd_index * 8, table | 7);
            table
        } else {
            pde & !0xfff
        };
        let index = (linear >> 12) & 0x1ff;
        self.write_u64(table + index * 8, phys | flags);
    }

    /// Runs until the vCPU exits.
    pub fn run(&mut self) -> VcpuExit {
        self.vcpu.run().unwrap()
    }

    pub fn add_pio(&self, base: u16, len: u16) -> Arc<Mutex<Recorder>> {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        self.io
            .pio
            .insert(dev.clone(), u64::from(base), u64::from(len))
            .unwrap();
        dev
    }

    pub fn add_mmio(&self, base: u64, len: u64) -> Arc<Mutex<Recorder>> {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        self.io.mmio.insert(dev.clone(), base, len).unwrap();
        dev
    }
}
