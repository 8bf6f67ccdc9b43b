//! Decoded-code cache: blocks of decoded instructions keyed by (linear, physical) address of
//! their first instruction, invalidated by physical page when the guest writes there.

use std::collections::HashMap;

use iced_x86::{Decoder, DecoderError, DecoderOptions, Instruction};

use super::decode;
use super::op::Op;
use super::{Cpu, Event, FastHash};
use crate::memory::{PAGE_OFFSET_MASK, PAGE_SIZE};
use crate::mmu::AccessKind;

/// Longest block, in instructions.
const MAX_BLOCK: usize = 64;
/// Bytes read from guest memory to decode one block.
const WINDOW: u64 = 1024;
/// Entries of the linear-address jump cache.
const JUMP_ENTRIES: usize = 4096;
/// Decoded instructions the cache holds at most (64 bytes each, so about 64 MiB). Blocks are
/// keyed by linear address, so a guest mapping code at ever new addresses could otherwise
/// make the VMM decode and keep code without bound; when full, the cache starts over (as
/// QEMU flushes its translation cache). A Linux boot to the shell keeps about 125 K.
const MAX_INSTRUCTIONS: usize = 1 << 20;

/// Decoded straight-line code ending at a control transfer (or a page or size limit).
pub struct Block {
    pub ops: Box<[Op]>,
    pub linear: u64,
    pub phys: u64,
    /// The bytes decoded, to notice changes made behind the engine's back (device DMA).
    bytes: Box<[u8]>,
    /// The DMA epoch at which `bytes` last matched memory.
    epoch: u64,
    /// For an instruction crossing into the next page: that page's physical address (the
    /// block is valid only while the linear page still maps there), and how many of `bytes`
    /// lie in the first page. `u64::MAX` otherwise.
    phys2: u64,
    split: usize,
    /// Blocks that ran after this one, most recent first (see [`Link`]).
    links: [Link; 2],
}

/// A remembered successor: under link key `key` (see [`CodeCache::link_key`]), the block at
/// linear address `target` is block `index`. Only successors in the same linear page as the
/// block are linked, and only blocks within one page are link targets, so following a link
/// stands for a translation of a page the block itself was found through.
#[derive(Clone, Copy)]
struct Link {
    target: u64,
    index: u32,
    key: u64,
}

impl Link {
    /// Matches no key (keys are never `u64::MAX`).
    const NONE: Link = Link {
        target: u64::MAX,
        index: 0,
        key: u64::MAX,
    };
}

impl Block {
    /// The physical pages the block's bytes come from.
    fn pages(&self) -> impl Iterator<Item = u64> {
        let second = (self.phys2 != u64::MAX).then_some(self.phys2);
        std::iter::once(self.phys & !PAGE_OFFSET_MASK).chain(second)
    }

    /// Whether the block may still run: a second page must still be mapped where it was,
    /// and the bytes must match memory (checked once per DMA epoch).
    #[inline(always)]
    fn still_valid(&mut self, cpu: &mut Cpu, epoch: u64) -> Result<bool, Event> {
        if self.phys2 == u64::MAX && self.epoch == epoch {
            return Ok(true);
        }
        self.still_valid_slow(cpu, epoch)
    }

    #[inline(never)]
    fn still_valid_slow(&mut self, cpu: &mut Cpu, epoch: u64) -> Result<bool, Event> {
        if self.phys2 != u64::MAX {
            let next_page = (self.linear | PAGE_OFFSET_MASK).wrapping_add(1);
            if cpu.translate(next_page, AccessKind::Execute, cpu.mmu.user)? != self.phys2 {
                return Ok(false);
            }
        }
        if self.epoch == epoch {
            return Ok(true);
        }
        let mut current = [0u8; WINDOW as usize];
        let current = &mut current[..self.bytes.len()];
        let (head, tail) = current.split_at_mut(self.split.min(self.bytes.len()));
        cpu.mmu.mem.read(self.phys, head);
        if !tail.is_empty() {
            cpu.mmu.mem.read(self.phys2, tail);
        }
        if *current != *self.bytes {
            return Ok(false);
        }
        self.epoch = epoch;
        Ok(true)
    }
}

/// All decoded blocks of one vCPU.
pub struct CodeCache {
    blocks: Vec<Option<Block>>,
    free: Vec<u32>,
    map: HashMap<(u64, u64), u32, FastHash>,
    pages: HashMap<u64, Vec<u32>, FastHash>,
    jump: Box<[(u64, u32); JUMP_ENTRIES]>,
    /// Decoded instructions in all blocks, and how many make the cache start over.
    instructions: usize,
    limit: usize,
    /// Links made before the last change of this generation are dead. It changes when a
    /// block is removed, the cache is cleared, the TLB is flushed (fully or one page:
    /// mappings may have changed) or a new DMA epoch begins (blocks must be compared with
    /// memory again).
    link_generation: u64,
    /// The TLB's `changes` and the DMA epoch when the generation last changed.
    seen_tlb_changes: u64,
    seen_epoch: u64,
}

impl Default for CodeCache {
    fn default() -> Self {
        Self::new()
    }
}

impl CodeCache {
    pub fn new() -> Self {
        Self::with_limit(MAX_INSTRUCTIONS)
    }

    /// A cache holding at most `limit` decoded instructions.
    fn with_limit(limit: usize) -> Self {
        CodeCache {
            blocks: Vec::new(),
            free: Vec::new(),
            map: HashMap::default(),
            pages: HashMap::default(),
            jump: Box::new([(u64::MAX, 0); JUMP_ENTRIES]),
            instructions: 0,
            limit,
            link_generation: 0,
            seen_tlb_changes: 0,
            seen_epoch: 0,
        }
    }

    fn jump_slot(linear: u64) -> usize {
        ((linear ^ (linear >> 12)) as usize) & (JUMP_ENTRIES - 1)
    }

    /// The block starting at `linear` (physical `phys`), decoding it if needed; the index
    /// is for `block`. `epoch` is the current DMA epoch: a block not checked since it changed
    /// is compared with memory first.
    #[inline]
    pub fn find(
        &mut self,
        cpu: &mut Cpu,
        linear: u64,
        phys: u64,
        epoch: u64,
    ) -> Result<u32, Event> {
        if let Some(index) = self.lookup(linear, phys) {
            if let Some(Some(block)) = self.blocks.get_mut(index as usize) {
                if block.still_valid(cpu, epoch)? {
                    return Ok(index);
                }
            }
            self.remove(cpu, index);
        }
        self.translate(cpu, linear, phys, epoch)
    }

    /// The key under which links are made and followed now: the link generation (brought
    /// up to date with the TLB and the DMA epoch `epoch`) and the privilege.
    #[inline(always)]
    pub fn link_key(&mut self, cpu: &Cpu, epoch: u64) -> u64 {
        if cpu.mmu.tlb.changes != self.seen_tlb_changes || epoch != self.seen_epoch {
            self.seen_tlb_changes = cpu.mmu.tlb.changes;
            self.seen_epoch = epoch;
            self.link_generation += 1;
        }
        (self.link_generation << 1) | u64::from(cpu.mmu.user)
    }

    /// The block linked from block `from` for `target` under `key`, if any. `from` must
    /// have been found under `key` (so it is still cached).
    #[inline(always)]
    pub fn linked(&self, from: u32, target: u64, key: u64) -> Option<u32> {
        let block = self.block(from)?;
        block
            .links
            .iter()
            .find(|link| link.target == target && link.key == key)
            .map(|link| link.index)
    }

    /// Remembers that block `to`, found under `key` for linear address `target`, ran after
    /// block `from` (found under the same key). Does nothing unless `target` is in the same
    /// linear page as `from` and `to` lies within one page.
    pub fn link(&mut self, from: u32, target: u64, to: u32, key: u64) {
        let Some(to_block) = self.block(to) else {
            return;
        };
        if to_block.phys2 != u64::MAX || to_block.linear != target {
            return;
        }
        let Some(Some(block)) = self.blocks.get_mut(from as usize) else {
            return;
        };
        if block.linear & !PAGE_OFFSET_MASK != target & !PAGE_OFFSET_MASK {
            return;
        }
        block.links[1] = block.links[0];
        block.links[0] = Link {
            target,
            index: to,
            key,
        };
    }

    /// The cached block for (`linear`, `phys`): the jump cache, then the map.
    #[inline]
    fn lookup(&mut self, linear: u64, phys: u64) -> Option<u32> {
        let slot = Self::jump_slot(linear);
        let (cached_linear, index) = self.jump[slot];
        if cached_linear == linear {
            if let Some(Some(block)) = self.blocks.get(index as usize) {
                if block.linear == linear && block.phys == phys {
                    return Some(index);
                }
            }
        }
        let index = *self.map.get(&(linear, phys))?;
        self.jump[slot] = (linear, index);
        Some(index)
    }

    /// Drops block `index` and forgets code pages left without blocks.
    fn remove(&mut self, cpu: &mut Cpu, index: u32) {
        let Some(block) = self.blocks.get_mut(index as usize).and_then(Option::take) else {
            return;
        };
        self.map.remove(&(block.linear, block.phys));
        // Links to this slot (which may be reused) and from it die.
        self.link_generation += 1;
        self.free.push(index);
        self.instructions -= block.ops.len();
        for page in block.pages() {
            if let Some(list) = self.pages.get_mut(&page) {
                list.retain(|&i| i != index);
                if list.is_empty() {
                    self.pages.remove(&page);
                    cpu.mmu.code_pages.remove(&page);
                }
            }
        }
        cpu.stats.code_invalidations += 1;
    }

    /// The block at `index` (from `find`).
    #[inline]
    pub fn block(&self, index: u32) -> Option<&Block> {
        self.blocks.get(index as usize).and_then(Option::as_ref)
    }

    /// Number of cached blocks.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Number of decoded instructions in the cached blocks.
    pub fn instructions(&self) -> usize {
        self.instructions
    }

    fn translate(
        &mut self,
        cpu: &mut Cpu,
        linear: u64,
        phys: u64,
        epoch: u64,
    ) -> Result<u32, Event> {
        cpu.stats.blocks_translated += 1;
        require_ram(cpu, linear, phys)?;
        let in_page = PAGE_SIZE - (phys & PAGE_OFFSET_MASK);
        let window = in_page.min(WINDOW);
        let mut bytes = vec![0u8; window as usize];
        cpu.mmu.mem.read(phys, &mut bytes);
        let mut decoder = Decoder::with_ip(64, &bytes, linear, DecoderOptions::NONE);
        let mut ops = Vec::new();
        let mut inst = Instruction::default();
        loop {
            let position = decoder.position();
            decoder.decode_out(&mut inst);
            if inst.is_invalid() && decoder.last_error() == DecoderError::NoMoreBytes {
                if ops.is_empty() {
                    // The window holds many instructions, so only one at the end of the page
                    // can run out of bytes as the first: it crosses into the next page.
                    return self.translate_crossing(cpu, linear, phys, &bytes[position..], epoch);
                }
                // Stop before it; the next block starts there.
                break;
            }
            ops.push(decode::prepare(&inst));
            if decode::ends_block(&inst)
                || ops.len() >= MAX_BLOCK
                || decoder.position() >= bytes.len()
            {
                break;
            }
        }
        let length = decoder.position() as u64;
        let ends = ops
            .last()
            .map_or(0, |op: &Op| op.inst.next_ip().wrapping_sub(linear));
        let decoded = ends.min(length);
        let block = Block {
            ops: ops.into_boxed_slice(),
            linear,
            phys,
            bytes: bytes[..decoded as usize].into(),
            epoch,
            phys2: u64::MAX,
            split: decoded as usize,
            links: [Link::NONE; 2],
        };
        Ok(self.insert(cpu, block))
    }

    /// Adds a translated block to the cache and marks its pages as code.
    fn insert(&mut self, cpu: &mut Cpu, block: Block) -> u32 {
        if self.instructions + block.ops.len() > self.limit {
            self.clear(cpu);
            cpu.stats.code_cache_resets += 1;
        }
        self.instructions += block.ops.len();
        let (linear, phys) = (block.linear, block.phys);
        let pages = block.pages();
        let index = match self.free.pop() {
            Some(i) => {
                self.blocks[i as usize] = Some(block);
                i
            }
            None => {
                self.blocks.push(Some(block));
                (self.blocks.len() - 1) as u32
            }
        };
        self.map.insert((linear, phys), index);
        for page in pages {
            self.pages.entry(page).or_default().push(index);
            if cpu.mmu.code_pages.insert(page) {
                cpu.mmu.tlb.protect_code_page(page);
            }
        }
        self.jump[Self::jump_slot(linear)] = (linear, index);
        index
    }

    /// Decodes one instruction that starts in one page and ends in the next, as a block of
    /// its own tied to both physical pages.
    fn translate_crossing(
        &mut self,
        cpu: &mut Cpu,
        linear: u64,
        phys: u64,
        head: &[u8],
        epoch: u64,
    ) -> Result<u32, Event> {
        let next_page = (linear | PAGE_OFFSET_MASK).wrapping_add(1);
        let next_phys = cpu.translate(next_page, AccessKind::Execute, cpu.mmu.user)?;
        // Code is fetched from RAM only: reading a device register has side effects.
        require_ram(cpu, next_page, next_phys)?;
        let mut bytes = head.to_vec();
        let mut tail = [0u8; 15];
        cpu.mmu.mem.read(next_phys & !PAGE_OFFSET_MASK, &mut tail);
        bytes.extend_from_slice(&tail);
        let mut decoder = Decoder::with_ip(64, &bytes, linear, DecoderOptions::NONE);
        let inst = decoder.decode();
        let length = inst.len().max(1).min(bytes.len());
        let block = Block {
            ops: vec![decode::prepare(&inst)].into_boxed_slice(),
            linear,
            phys,
            bytes: bytes[..length].into(),
            epoch,
            phys2: next_phys & !PAGE_OFFSET_MASK,
            split: head.len(),
            links: [Link::NONE; 2],
        };
        Ok(self.insert(cpu, block))
    }

    /// Drops the blocks of the code pages the guest wrote (`cpu.mmu.code_writes`).
    pub fn invalidate_writes(&mut self, cpu: &mut Cpu) {
        let mut writes = std::mem::take(&mut cpu.mmu.code_writes);
        for &page in &writes {
            let Some(list) = self.pages.remove(&page) else {
                continue;
            };
            for index in list {
                // The list may name slots reused since by blocks elsewhere.
                if matches!(self.block(index), Some(block) if block.pages().any(|p| p == page)) {
                    self.remove(cpu, index);
                }
            }
        }
        writes.clear();
        cpu.mmu.code_writes = writes;
    }

    /// Drops everything.
    pub fn clear(&mut self, cpu: &mut Cpu) {
        self.blocks.clear();
        self.free.clear();
        self.map.clear();
        self.pages.clear();
        self.jump.fill((u64::MAX, 0));
        self.instructions = 0;
        self.link_generation += 1;
        cpu.mmu.code_pages.clear();
        cpu.mmu.code_writes.clear();
        cpu.mmu.tlb.flush();
    }
}

/// Fails unless the code at `linear` (physical `phys`) is in RAM.
fn require_ram(cpu: &Cpu, linear: u64, phys: u64) -> Result<(), Event> {
    if cpu.mmu.mem.is_ram(phys) {
        Ok(())
    } else {
        Err(Event::fatal(format!(
            "Executing outside RAM at {linear:#x} (physical {phys:#x})"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::PhysicalMemory;
    use lodge_bus::IoBus;
    use std::sync::Arc;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    /// A CPU whose memory holds RET at 0x1000..0x3000: every byte starts a block of one
    /// instruction.
    fn cpu_over_returns() -> Cpu {
        let ram = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        ram.write_slice(&[0xc3; 8192], GuestAddress(0x1000))
            .unwrap();
        Cpu::new(PhysicalMemory::new(ram, Arc::new(IoBus::new())))
    }

    #[test]
    fn a_full_cache_starts_over() {
        let mut cpu = cpu_over_returns();
        let mut cache = CodeCache::with_limit(100);
        for addr in 0x1000..0x1000 + 250 {
            let index = cache.find(&mut cpu, addr, addr, 0).unwrap();
            assert_eq!(cache.block(index).map(|b| b.linear), Some(addr));
            assert!(cache.instructions() <= 100);
        }
        assert_eq!(cpu.stats.code_cache_resets, 2);
        assert_eq!((cache.len(), cache.instructions()), (50, 50));
        // What is still cached is found again without translating.
        let translated = cpu.stats.blocks_translated;
        cache.find(&mut cpu, 0x1000 + 249, 0x1000 + 249, 0).unwrap();
        assert_eq!(cpu.stats.blocks_translated, translated);
    }

    #[test]
    fn links_hold_only_under_the_key_they_were_made_with() {
        let mut cpu = cpu_over_returns();
        let mut cache = CodeCache::new();
        let a = cache.find(&mut cpu, 0x1000, 0x1000, 0).unwrap();
        let b = cache.find(&mut cpu, 0x1010, 0x1010, 0).unwrap();
        let c = cache.find(&mut cpu, 0x2000, 0x2000, 0).unwrap();
        let key = cache.link_key(&cpu, 0);
        cache.link(a, 0x1010, b, key);
        assert_eq!(cache.linked(a, 0x1010, key), Some(b));
        assert_eq!(cache.linked(a, 0x1011, key), None, "another target");
        // Successors in another page are not linked.
        cache.link(a, 0x2000, c, key);
        assert_eq!(cache.linked(a, 0x2000, key), None);
        assert_eq!(cache.linked(a, 0x1010, key), Some(b));

        // Another privilege, a TLB flush of one page or of all, a new DMA epoch.
        cpu.mmu.user = true;
        assert_ne!(cache.link_key(&cpu, 0), key);
        cpu.mmu.user = false;
        assert_eq!(cache.link_key(&cpu, 0), key);
        cpu.mmu.tlb.flush_page(0x5000);
        let after_invlpg = cache.link_key(&cpu, 0);
        assert_ne!(after_invlpg, key);
        assert_eq!(cache.linked(a, 0x1010, after_invlpg), None);
        cache.link(a, 0x1010, b, after_invlpg);
        cpu.mmu.tlb.flush();
        let after_flush = cache.link_key(&cpu, 0);
        assert_ne!(after_flush, after_invlpg);
        assert_eq!(cache.linked(a, 0x1010, after_flush), None);
        cache.link(a, 0x1010, b, after_flush);
        let new_epoch = cache.link_key(&cpu, 1);
        assert_ne!(new_epoch, after_flush);
        assert_eq!(cache.linked(a, 0x1010, new_epoch), None);

        // Removing blocks (a write to their page) changes the key too.
        cache.link(a, 0x1010, b, new_epoch);
        cpu.mmu.code_writes.push(0x1000);
        cache.invalidate_writes(&mut cpu);
        assert_ne!(cache.link_key(&cpu, 1), new_epoch);
        assert!(cache.block(a).is_none() && cache.block(b).is_none());
    }
}
