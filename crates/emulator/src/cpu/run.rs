//! The execution loop: interrupts and timers between blocks, block execution, HLT.

use lodge_bus::MachineRequest;

use super::cache::{Block, CodeCache};
use super::flags::IF;
use super::{Cpu, Event};
use crate::mmu::AccessKind;
use crate::signals::Signals;

/// Instructions between polls of the host clock for the PIT.
const TIMER_POLL_INTERVAL: u64 = 16 * 1024;

/// Why the loop returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunExit {
    Stopped,
    Halted,
    TripleFault,
    /// A device asked for a machine reset or power-off during the last instruction.
    Requested(MachineRequest),
    Fatal(String),
}

impl Cpu {
    /// Runs the instructions of `block`.
    ///
    /// RIP is kept up to date only where something reads it: before the last instruction
    /// (the only one that may transfer control, read RIP or restart itself: see
    /// `decode::ends_block`), at an exception (the faulting instruction) and when a block
    /// stops early after a write to code (the next instruction).
    #[inline]
    fn execute(&mut self, block: &Block) -> Result<(), Event> {
        let Some((last, body)) = block.ops.split_last() else {
            return Ok(());
        };
        for (i, op) in body.iter().enumerate() {
            if let Err(e) = (op.handler)(self, op) {
                return Err(self.stopped_at(op, i, e));
            }
            if self.break_block {
                self.break_block = false;
                self.arch.rip = op.inst.next_ip();
                self.icount += i as u64 + 1;
                return Ok(());
            }
        }
        self.arch.rip = last.inst.next_ip();
        if let Err(e) = (last.handler)(self, last) {
            return Err(self.stopped_at(last, body.len(), e));
        }
        self.break_block = false;
        self.icount += block.ops.len() as u64;
        Ok(())
    }

    /// Sets RIP and the instruction count after instruction `op` (the `index`th of its block)
    /// raised `event`, and gives the event as the loop sees it.
    #[cold]
    #[inline(never)]
    fn stopped_at(&mut self, op: &super::op::Op, index: usize, event: Event) -> Event {
        let mut event = event;
        let halted = matches!(event, Event::Halt);
        // A fault restarts the instruction; HLT resumes after it.
        self.arch.rip = if halted {
            op.inst.next_ip()
        } else {
            op.inst.ip()
        };
        if op.seg == super::seg::SS as u8 {
            // A memory operand addressed through RSP or RBP uses the stack segment.
            event = event.into_stack_fault();
        }
        self.icount += index as u64 + u64::from(halted);
        event
    }

    /// Runs until a stop request, a halt with interrupts disabled, a triple fault or a fatal
    /// emulation error.
    pub fn run(&mut self, cache: &mut CodeCache, signals: &Signals) -> RunExit {
        Signals::enter_vcpu_thread();
        let mut next_poll = self.icount;
        // The block that last ran to its end, and the link key it was found under: the
        // next block is looked up in its links first.
        let mut previous: Option<(u32, u64)> = None;
        loop {
            // Blocks end after an access that raised a request (`after_device_access`).
            if let Some(request) = self.mmu.mem.io().requests.pending() {
                return RunExit::Requested(request);
            }
            if signals.any() {
                if signals.stop_requested() {
                    return RunExit::Stopped;
                }
                self.platform.collect_interrupts(signals);
            }
            if self.icount >= next_poll {
                self.platform.poll_timer();
                next_poll = self.icount + TIMER_POLL_INTERVAL;
            }
            if self.platform.pic.has_interrupt()
                && !self.arch.interrupt_shadow
                && self.arch.flags.system(IF)
            {
                if let Some(vector) = self.platform.pic.acknowledge() {
                    self.stats.interrupts += 1;
                    previous = None;
                    if let Err(e) = self.raise_external(vector) {
                        return exit_for(e);
                    }
                }
            }
            self.arch.interrupt_shadow = false;

            // Drop the blocks of code pages written since the last lookup: by the last block,
            // or by the frame of an exception or interrupt delivered since.
            if !self.mmu.code_writes.is_empty() {
                cache.invalidate_writes(self);
            }
            self.break_block = false;
            let rip = self.arch.rip;
            let epoch = signals.dma_epoch();
            let key = cache.link_key(self, epoch);
            let linked = match previous.take() {
                Some((from, from_key)) if from_key == key => {
                    cache.linked(from, rip, key).ok_or(Some(from))
                }
                _ => Err(None),
            };
            let found = match linked {
                Ok(index) => {
                    self.stats.linked_blocks += 1;
                    Ok((index, key))
                }
                Err(from) => {
                    self.stats.looked_up_blocks += 1;
                    self.translate(rip, AccessKind::Execute, self.mmu.user)
                        .and_then(|phys| cache.find(self, rip, phys, epoch))
                        .map(|index| {
                            // Finding may have removed blocks (the previous one among them),
                            // which changes the key: `from` is then not linked.
                            let now = cache.link_key(self, epoch);
                            if let Some(from) = from.filter(|_| now == key) {
                                cache.link(from, rip, index, now);
                            }
                            (index, now)
                        })
                }
            };
            let result = found.and_then(|(index, key)| match cache.block(index) {
                Some(block) => {
                    previous = Some((index, key));
                    self.execute(block)
                }
                None => Err(Event::fatal("Decoded block vanished")),
            });
            match result {
                Ok(()) => {}
                Err(Event::Exception(e)) => {
                    previous = None;
                    self.stats.exceptions += 1;
                    if let Err(e) = self.raise(e) {
                        return exit_for(e);
                    }
                }
                Err(Event::Halt) => {
                    if !self.arch.flags.system(IF) {
                        return RunExit::Halted;
                    }
                    if let Some(exit) = self.halt(signals) {
                        return exit;
                    }
                    next_poll = self.icount;
                }
                Err(e) => return exit_for(e),
            }
        }
    }

    /// Sleeps in HLT until an interrupt is deliverable or a stop is requested.
    fn halt(&mut self, signals: &Signals) -> Option<RunExit> {
        loop {
            if signals.stop_requested() {
                return Some(RunExit::Stopped);
            }
            self.platform.collect_interrupts(signals);
            self.platform.poll_timer();
            if self.platform.pic.has_interrupt() {
                return None;
            }
            let now = self.platform.clock.now();
            signals.wait(self.platform.time_to_next_timer());
            self.stats.halted_ns += self.platform.clock.now().saturating_sub(now);
        }
    }
}

fn exit_for(event: Event) -> RunExit {
    match event {
        Event::TripleFault => RunExit::TripleFault,
        Event::Fatal(reason) => RunExit::Fatal((*reason).into()),
        Event::Halt => RunExit::Halted,
        Event::Exception(e) => RunExit::Fatal(format!("Undeliverable exception {e:?}")),
    }
}
