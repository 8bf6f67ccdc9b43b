//! Chooses the handler for a decoded instruction, once, when its block is translated.

use iced_x86::{FlowControl, Instruction, Mnemonic, OpKind};

use super::op::{Handler, Op};
use super::{
    alu, bits, control, data, fpu, mmx, muldiv, shift, sse, sse_ext, sse_float, sse_string, string,
    system, x87,
};
use crate::cpuid;

/// Builds the executable form of `inst`.
pub fn prepare(inst: &Instruction) -> Op {
    let mut op = Op::new(*inst, handler_for(inst));
    if inst.mnemonic() == Mnemonic::Lea {
        // LEA computes an offset: no segment base.
        op.seg = 6;
    }
    op
}

/// Whether every CPUID feature `inst` needs is reported to the guest, counting encodings that
/// older CPUs execute as something else (TZCNT as BSF) or as a NOP (ENDBR,
/// PREFETCHW, hint NOPs).
fn allowed(inst: &Instruction) -> bool {
    match inst.mnemonic() {
        Mnemonic::Tzcnt | Mnemonic::Endbr32 | Mnemonic::Endbr64 | Mnemonic::Prefetchw => true,
        // 8087/80287 FPU controls that later FPUs accept as no-ops.
        Mnemonic::Feni
        | Mnemonic::Fneni
        | Mnemonic::Fdisi
        | Mnemonic::Fndisi
        | Mnemonic::Fsetpm
        | Mnemonic::Fnsetpm => true,
        _ => inst.cpuid_features().iter().all(|f| cpuid::supports(*f)),
    }
}

/// The handler executing `inst`.
pub fn handler_for(inst: &Instruction) -> Handler {
    if inst.is_invalid() || !allowed(inst) {
        return system::undefined;
    }
    alu::select(inst)
        .or_else(|| data::select(inst))
        .or_else(|| control::select(inst))
        .or_else(|| shift::select(inst))
        .or_else(|| muldiv::select(inst))
        .or_else(|| bits::select(inst))
        .or_else(|| string::select(inst))
        .or_else(|| system::select(inst))
        .or_else(|| fpu::select(inst))
        .or_else(|| mmx::select(inst))
        .or_else(|| sse::select(inst))
        .or_else(|| sse_ext::select(inst))
        .or_else(|| sse_float::select(inst))
        .or_else(|| sse_string::select(inst))
        .or_else(|| x87::select(inst))
        .unwrap_or(system::unimplemented)
}

/// Whether `inst` must be the last of its block: control transfers, and anything that changes
/// how the following instructions are fetched, translated or interrupted.
pub fn ends_block(inst: &Instruction) -> bool {
    if inst.flow_control() != FlowControl::Next {
        return true;
    }
    if string::select(inst).is_some() && (inst.has_rep_prefix() || inst.has_repne_prefix()) {
        // A long REP instruction yields by restarting itself (setting RIP), which only the
        // last instruction of a block may do.
        return true;
    }
    let writes_special_register = inst.op_count() > 0
        && inst.op_kind(0) == OpKind::Register
        && (inst.op0_register().is_cr()
            || inst.op0_register().is_dr()
            || inst.op0_register().is_segment_register());
    writes_special_register
        || matches!(
            inst.mnemonic(),
            Mnemonic::Wrmsr
                | Mnemonic::Lgdt
                | Mnemonic::Lidt
                | Mnemonic::Ltr
                | Mnemonic::Lldt
                | Mnemonic::Invlpg
                | Mnemonic::Popf
                | Mnemonic::Popfq
                | Mnemonic::Sti
                | Mnemonic::Hlt
                | Mnemonic::Lmsw
                | Mnemonic::Clts
                | Mnemonic::Swapgs
                | Mnemonic::Fxrstor
                | Mnemonic::Fxrstor64
        )
}
