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
}

/// A block to execute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockRef {
    Cached(u32),
}

/// All decoded blocks of one vCPU.
pub struct CodeCache {
    blocks: Vec<Option<Block>>,
    free: Vec<u32>,
    map: HashMap<(u64, u64), u32, FastHash>,
    pages: HashMap<u64, Vec<u32>, FastHash>,
    jump: Box<[(u64, u32)]>,
}

impl Default for CodeCache {
    fn default() -> Self {
        Self::new()
    }
}

impl CodeCache {
    pub fn new() -> Self {
        CodeCache {
            blocks: Vec::new(),
            free: Vec::new(),
            map: HashMap::default(),
            pages: HashMap::default(),
            jump: vec![(u64::MAX, 0); JUMP_ENTRIES].into_boxed_slice(),
        }
    }

    fn jump_slot(linear: u64) -> usize {
        ((linear ^ (linear >> 12)) as usize) & (JUMP_ENTRIES - 1)
    }

    /// The block starting at `linear` (physical `phys`), decoding it if needed. `epoch` is the
    /// current DMA epoch: a block not checked since it changed is compared with memory first.
    #[inline]
    pub fn find(
        &mut self,
        cpu: &mut Cpu,
        linear: u64,
        phys: u64,
        epoch: u64,
    ) -> Result<BlockRef, Event> {
        let slot = Self::jump_slot(linear);
        let (cached_linear, index) = self.jump[slot];
        let mut found = None;
        if cached_linear == linear {
            if let Some(Some(block)) = self.blocks.get(index as usize) {
                if block.phys == phys && block.linear == linear {
                    found = Some(index);
                }
            }
        }
        if found.is_none() {
            if let Some(&index) = self.map.get(&(linear, phys)) {
                self.jump[slot] = (linear, index);
                found = Some(index);
            }
        }
        if let Some(index) = found {
            let phys2 = self
                .blocks
                .get(index as usize)
                .and_then(Option::as_ref)
                .map_or(u64::MAX, |b| b.phys2);
            let same_mapping = phys2 == u64::MAX || {
                let next_page = (linear | PAGE_OFFSET_MASK).wrapping_add(1);
                cpu.translate(next_page, AccessKind::Execute, cpu.user)? == phys2
            };
            if same_mapping && self.still_valid(cpu, index, epoch) {
                return Ok(BlockRef::Cached(index));
            }
            self.remove(cpu, index);
        }
        self.translate(cpu, linear, phys, epoch)
    }

    /// Whether block `index` still matches memory (checked once per DMA epoch).
    fn still_valid(&mut self, cpu: &Cpu, index: u32, epoch: u64) -> bool {
        let Some(Some(block)) = self.blocks.get_mut(index as usize) else {
            return false;
        };
        if block.epoch == epoch {
            return true;
        }
        let mut current = [0u8; WINDOW as usize];
        let current = &mut current[..block.bytes.len()];
        if block.phys2 == u64::MAX {
            cpu.mem.read(block.phys, current);
        } else {
            let (head, tail) = current.split_at_mut(block.split.min(block.bytes.len()));
            cpu.mem.read(block.phys, head);
            cpu.mem.read(block.phys2, tail);
        }
        if *current != *block.bytes {
            return false;
        }
        block.epoch = epoch;
        true
    }

    /// Drops block `index`.
    fn remove(&mut self, cpu: &mut Cpu, index: u32) {
        let Some(Some(block)) = self.blocks.get_mut(index as usize) else {
            return;
        };
        let pages = [
            block.phys & !PAGE_OFFSET_MASK,
            block.phys2 & !PAGE_OFFSET_MASK,
        ];
        let crossing = block.phys2 != u64::MAX;
        self.map.remove(&(block.linear, block.phys));
        self.blocks[index as usize] = None;
        self.free.push(index);
        for page in &pages[..1 + usize::from(crossing)] {
            if let Some(list) = self.pages.get_mut(page) {
                list.retain(|&i| i != index);
                if list.is_empty() {
                    self.pages.remove(page);
                    cpu.code_pages.remove(page);
                }
            }
        }
        cpu.stats.code_invalidations += 1;
    }

    /// The block behind `r`.
    #[inline]
    pub fn block(&self, r: BlockRef) -> Option<&Block> {
        match r {
            BlockRef::Cached(i) => self.blocks.get(i as usize).and_then(Option::as_ref),
        }
    }

    /// Number of cached blocks.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    fn translate(
        &mut self,
        cpu: &mut Cpu,
        linear: u64,
        phys: u64,
        epoch: u64,
    ) -> Result<BlockRef, Event> {
        cpu.stats.blocks_translated += 1;
        require_ram(cpu, linear, phys)?;
        let in_page = PAGE_SIZE - (phys & PAGE_OFFSET_MASK);
        let window = in_page.min(WINDOW);
        let mut bytes = vec![0u8; window as usize];
        cpu.mem.read(phys, &mut bytes);
        let mut decoder = Decoder::with_ip(64, &bytes, linear, DecoderOptions::NONE);
        let mut ops = Vec::new();
        let mut inst = Instruction::default();
        loop {
            let position = decoder.position();
            decoder.decode_out(&mut inst);
            if inst.is_invalid() && decoder.last_error() == DecoderError::NoMoreBytes {
                if !ops.is_empty() || window < in_page {
                    // Stop before it; the next block starts there.
                    if ops.is_empty() {
                        return Err(Event::fatal("Instruction longer than the decode window"));
                    }
                    break;
                }
                // The first instruction crosses into the next page.
                return self.translate_crossing(cpu, linear, phys, &bytes[position..], epoch);
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
        };
        Ok(BlockRef::Cached(self.insert(cpu, block)))
    }

    /// Adds a translated block to the cache and marks its pages as code.
    fn insert(&mut self, cpu: &mut Cpu, block: Block) -> u32 {
        let (linear, phys, phys2) = (block.linear, block.phys, block.phys2);
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
        let pages = [phys & !PAGE_OFFSET_MASK, phys2 & !PAGE_OFFSET_MASK];
        for &page in &pages[..1 + usize::from(phys2 != u64::MAX)] {
            self.pages.entry(page).or_default().push(index);
            if cpu.code_pages.insert(page) {
                cpu.tlb.protect_code_page(page);
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
    ) -> Result<BlockRef, Event> {
        let next_page = (linear | PAGE_OFFSET_MASK).wrapping_add(1);
        let next_phys = cpu.translate(next_page, AccessKind::Execute, cpu.user)?;
        // Code is fetched from RAM only: reading a device register has side effects.
        require_ram(cpu, next_page, next_phys)?;
        let mut bytes = head.to_vec();
        let mut tail = [0u8; 15];
        cpu.mem.read(next_phys & !PAGE_OFFSET_MASK, &mut tail);
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
        };
        Ok(BlockRef::Cached(self.insert(cpu, block)))
    }

    /// Drops the blocks of the code pages the guest wrote (`cpu.code_writes`).
    pub fn invalidate_writes(&mut self, cpu: &mut Cpu) {
        let mut writes = std::mem::take(&mut cpu.code_writes);
        for &page in &writes {
            let Some(list) = self.pages.remove(&page) else {
                continue;
            };
            for index in list {
                if let Some(Some(block)) = self.blocks.get(index as usize) {
                    if block.phys & !PAGE_OFFSET_MASK == page
                        || block.phys2 & !PAGE_OFFSET_MASK == page
                    {
                        self.map.remove(&(block.linear, block.phys));
                        self.blocks[index as usize] = None;
                        self.free.push(index);
                        cpu.stats.code_invalidations += 1;
                    }
                }
            }
        }
        writes.clear();
        cpu.code_writes = writes;
    }

    /// Drops everything.
    pub fn clear(&mut self, cpu: &mut Cpu) {
        self.blocks.clear();
        self.free.clear();
        self.map.clear();
        self.pages.clear();
        self.jump.fill((u64::MAX, 0));
        cpu.code_pages.clear();
        cpu.code_writes.clear();
        cpu.tlb.flush();
    }
}

/// Fails unless the code at `linear` (physical `phys`) is in RAM.
fn require_ram(cpu: &Cpu, linear: u64, phys: u64) -> Result<(), Event> {
    if cpu.mem.is_ram(phys) {
        Ok(())
    } else {
        Err(Event::fatal(format!(
            "Executing outside RAM at {linear:#x} (physical {phys:#x})"
        )))
    }
}
