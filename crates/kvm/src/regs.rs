//! Conversions between lodge's register state and KVM's.

use kvm_bindings::{kvm_dtable, kvm_regs, kvm_segment, kvm_sregs};

use lodge_engine::{CpuState, DescriptorTable, Registers, Segment, SpecialRegisters};

pub(super) fn to_kvm_regs(r: &Registers) -> kvm_regs {
    kvm_regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

pub(super) fn from_kvm_regs(r: &kvm_regs) -> Registers {
    Registers {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

/// Applies `s` onto `sregs` read from KVM, keeping the fields lodge does not model (APIC base,
/// interrupt bitmap).
pub(super) fn apply_sregs(sregs: &mut kvm_sregs, s: &SpecialRegisters) {
    sregs.cs = to_kvm_segment(&s.cs);
    sregs.ds = to_kvm_segment(&s.ds);
    sregs.es = to_kvm_segment(&s.es);
    sregs.fs = to_kvm_segment(&s.fs);
    sregs.gs = to_kvm_segment(&s.gs);
    sregs.ss = to_kvm_segment(&s.ss);
    sregs.tr = to_kvm_segment(&s.tr);
    sregs.ldt = to_kvm_segment(&s.ldt);
    sregs.gdt = to_kvm_dtable(&s.gdt);
    sregs.idt = to_kvm_dtable(&s.idt);
    sregs.cr0 = s.cr0;
    sregs.cr2 = s.cr2;
    sregs.cr3 = s.cr3;
    sregs.cr4 = s.cr4;
    sregs.cr8 = s.cr8;
    sregs.efer = s.efer;
}

pub(super) fn from_kvm_sregs(s: &kvm_sregs) -> SpecialRegisters {
    SpecialRegisters {
        cs: from_kvm_segment(&s.cs),
        ds: from_kvm_segment(&s.ds),
        es: from_kvm_segment(&s.es),
        fs: from_kvm_segment(&s.fs),
        gs: from_kvm_segment(&s.gs),
        ss: from_kvm_segment(&s.ss),
        tr: from_kvm_segment(&s.tr),
        ldt: from_kvm_segment(&s.ldt),
        gdt: DescriptorTable {
            base: s.gdt.base,
            limit: s.gdt.limit,
        },
        idt: DescriptorTable {
            base: s.idt.base,
            limit: s.idt.limit,
        },
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        cr8: s.cr8,
        efer: s.efer,
    }
}

pub(super) fn cpu_state(regs: &kvm_regs, sregs: &kvm_sregs) -> CpuState {
    CpuState {
        regs: from_kvm_regs(regs),
        sregs: from_kvm_sregs(sregs),
    }
}

fn to_kvm_segment(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present.into(),
        dpl: s.dpl,
        db: s.db.into(),
        s: s.s.into(),
        l: s.l.into(),
        g: s.g.into(),
        avl: s.avl.into(),
        unusable: s.unusable.into(),
        padding: 0,
    }
}

fn from_kvm_segment(s: &kvm_segment) -> Segment {
    Segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present != 0,
        dpl: s.dpl,
        db: s.db != 0,
        s: s.s != 0,
        l: s.l != 0,
        g: s.g != 0,
        avl: s.avl != 0,
        unusable: s.unusable != 0,
    }
}

fn to_kvm_dtable(t: &DescriptorTable) -> kvm_dtable {
    kvm_dtable {
        base: t.base,
        limit: t.limit,
        padding: [0; 3],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_state_round_trips() {
        let mut state = CpuState::default();
        state.regs.rip = 0x100_0000;
        state.regs.rsi = 0x7000;
        state.regs.r15 = 15;
        state.sregs.cs = Segment::from_descriptor(0x10, 0x00af_9b00_0000_ffff);
        state.sregs.gdt = DescriptorTable {
            base: 0x500,
            limit: 0x27,
        };
        state.sregs.cr3 = 0x9000;
        state.sregs.efer = 0x500;
        let regs = to_kvm_regs(&state.regs);
        let mut sregs = kvm_sregs {
            apic_base: 0xfee0_0900,
            ..Default::default()
        };
        apply_sregs(&mut sregs, &state.sregs);
        assert_eq!(
            sregs.apic_base, 0xfee0_0900,
            "fields lodge does not model are kept"
        );
        assert_eq!(cpu_state(&regs, &sregs), state);
    }
}
