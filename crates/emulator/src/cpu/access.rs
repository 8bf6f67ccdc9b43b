//! Linear-memory access: the TLB fast path, page walks, page-crossing and MMIO slow paths.

use std::ops::Range;

use super::{Cpu, Event};
use crate::memory::{PAGE_OFFSET_MASK, PAGE_SIZE};
use crate::mmu::{self, AccessKind};
use crate::tlb::PageRights;

/// Where a `B`-byte read-modify-write operand lives. Only `Cpu::locate` makes one, so a
/// host address in it has been checked like a fast write.
#[derive(Clone, Copy, Debug)]
pub struct Place<const B: usize>(Location);

#[derive(Clone, Copy, Debug)]
enum Location {
    /// Host address of the operand: RAM with a fast write tag, all `B` bytes in one page.
    Host(usize),
    /// Anything else: accessed through the slow path, already checked for writing.
    Slow(u64),
}

/// Reads `B` bytes (1, 2, 4 or 8) at a host address.
///
/// # Safety
/// `host..host + B` must lie inside guest RAM that stays mapped while the `Cpu` lives.
#[inline(always)]
unsafe fn host_load<const B: usize>(host: usize) -> u64 {
    // SAFETY: the caller guarantees the bytes are mapped guest RAM. They hold no Rust
    // invariants (any value is valid) and need not be aligned, hence unaligned raw reads.
    // Device threads may write guest RAM concurrently (DMA): the value read may then mix old
    // and new bytes, as a CPU's would. The Rust memory model leaves such a race undefined;
    // volatile or atomic accesses would need alignment the guest does not promise, so the
    // engine accepts it as other emulators do.
    unsafe {
        match B {
            1 => u64::from(std::ptr::read(host as *const u8)),
            2 => u64::from(std::ptr::read_unaligned(host as *const u16)),
            4 => u64::from(std::ptr::read_unaligned(host as *const u32)),
            _ => std::ptr::read_unaligned(host as *const u64),
        }
    }
}

/// Writes the low `B` bytes of `value` at a host address.
///
/// # Safety
/// As for `host_load`.
#[inline(always)]
unsafe fn host_store<const B: usize>(host: usize, value: u64) {
    // SAFETY: as in `host_load`; writing any bytes there is valid for the same reasons.
    unsafe {
        match B {
            1 => std::ptr::write(host as *mut u8, value as u8),
            2 => std::ptr::write_unaligned(host as *mut u16, value as u16),
            4 => std::ptr::write_unaligned(host as *mut u32, value as u32),
            _ => std::ptr::write_unaligned(host as *mut u64, value),
        }
    }
}

/// Splits `len` bytes at `linear` into runs within one page: each run's linear address and
/// its range in the buffer.
fn page_chunks(linear: u64, len: usize) -> impl Iterator<Item = (u64, Range<usize>)> {
    let mut done = 0;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let addr = linear.wrapping_add(done as u64);
        let chunk = (PAGE_SIZE - (addr & PAGE_OFFSET_MASK)).min((len - done) as u64) as usize;
        let range = done..done + chunk;
        done += chunk;
        Some((addr, range))
    })
}

impl Cpu {
    /// Reads `B` bytes at `linear` with the current privilege.
    #[inline(always)]
    pub fn read<const B: usize>(&mut self, linear: u64) -> Result<u64, Event> {
        let entry = self.mmu.tlb.entry(linear, self.mmu.user);
        if entry.read == self.mmu.tlb.tag(linear)
            && (linear & PAGE_OFFSET_MASK) as usize <= PAGE_SIZE as usize - B
        {
            let host = linear.wrapping_add(entry.addend) as usize;
            // SAFETY: a fast read tag is only set for a linear page whose physical page is RAM
            // entirely inside one region (`PhysicalMemory::host_page`), `addend` maps the
            // linear page onto that host page, and the access stays inside the page.
            return Ok(unsafe { host_load::<B>(host) });
        }
        self.read_slow(linear, B, self.mmu.user)
    }

    /// Writes the low `B` bytes of `value` at `linear` with the current privilege.
    #[inline(always)]
    pub fn write<const B: usize>(&mut self, linear: u64, value: u64) -> Result<(), Event> {
        let entry = self.mmu.tlb.entry(linear, self.mmu.user);
        if entry.write == self.mmu.tlb.tag(linear)
            && (linear & PAGE_OFFSET_MASK) as usize <= PAGE_SIZE as usize - B
        {
            let host = linear.wrapping_add(entry.addend) as usize;
            // SAFETY: as in `read`; fast write tags are additionally withheld from pages
            // holding decoded code, so no invalidation is missed.
            unsafe { host_store::<B>(host, value) };
            return Ok(());
        }
        self.write_slow(linear, &value.to_le_bytes()[..B], self.mmu.user)
    }

    /// Reads `B` bytes of the stack: an implicit stack-segment access, so a non-canonical
    /// address raises #SS instead of #GP.
    #[inline(always)]
    pub fn stack_read<const B: usize>(&mut self, linear: u64) -> Result<u64, Event> {
        self.read::<B>(linear).map_err(Event::into_stack_fault)
    }

    /// Writes `B` bytes of the stack (see `stack_read`).
    #[inline(always)]
    pub fn stack_write<const B: usize>(&mut self, linear: u64, value: u64) -> Result<(), Event> {
        self.write::<B>(linear, value)
            .map_err(Event::into_stack_fault)
    }

    /// Finds a read-modify-write operand, checking write access first.
    #[inline(always)]
    pub fn locate<const B: usize>(&mut self, linear: u64) -> Result<Place<B>, Event> {
        let entry = self.mmu.tlb.entry(linear, self.mmu.user);
        if entry.write == self.mmu.tlb.tag(linear)
            && (linear & PAGE_OFFSET_MASK) as usize <= PAGE_SIZE as usize - B
        {
            let host = linear.wrapping_add(entry.addend) as usize;
            return Ok(Place(Location::Host(host)));
        }
        self.check_writable(linear, B, self.mmu.user)?;
        Ok(Place(Location::Slow(linear)))
    }

    /// Reads a located operand.
    #[inline(always)]
    pub fn place_read<const B: usize>(&mut self, place: Place<B>) -> Result<u64, Event> {
        match place.0 {
            // SAFETY: `locate` made this `Place<B>` from a fast write tag, as `write` checks:
            // the `B` bytes are RAM inside one page.
            Location::Host(host) => Ok(unsafe { host_load::<B>(host) }),
            Location::Slow(linear) => self.read_slow(linear, B, self.mmu.user),
        }
    }

    /// Writes a located operand.
    #[inline(always)]
    pub fn place_write<const B: usize>(
        &mut self,
        place: Place<B>,
        value: u64,
    ) -> Result<(), Event> {
        match place.0 {
            Location::Host(host) => {
                // SAFETY: as in `place_read`; a fast write tag also means the page holds no
                // decoded code, so no invalidation is missed.
                unsafe { host_store::<B>(host, value) };
                Ok(())
            }
            Location::Slow(linear) => {
                self.write_slow(linear, &value.to_le_bytes()[..B], self.mmu.user)
            }
        }
    }

    /// Reads `size` bytes (1, 2, 4 or 8, chosen at run time) at `linear`.
    #[inline]
    pub fn read_sized(&mut self, linear: u64, size: usize) -> Result<u64, Event> {
        match size {
            1 => self.read::<1>(linear),
            2 => self.read::<2>(linear),
            4 => self.read::<4>(linear),
            _ => self.read::<8>(linear),
        }
    }

    /// Reads 16 bytes (XMM operands).
    #[inline]
    pub fn read_u128(&mut self, linear: u64) -> Result<u128, Event> {
        if (linear & PAGE_OFFSET_MASK) <= PAGE_SIZE - 16 {
            let low = self.read::<8>(linear)?;
            let high = self.read::<8>(linear.wrapping_add(8))?;
            return Ok(u128::from(low) | (u128::from(high) << 64));
        }
        let mut b = [0u8; 16];
        let user = self.mmu.user;
        self.read_bytes(linear, &mut b, user)?;
        Ok(u128::from_le_bytes(b))
    }

    /// Writes 16 bytes; nothing is written if any byte faults.
    #[inline]
    pub fn write_u128(&mut self, linear: u64, value: u128) -> Result<(), Event> {
        if (linear & PAGE_OFFSET_MASK) <= PAGE_SIZE - 16 {
            // Both halves are in one page: if the first write succeeds the second does too.
            self.write::<8>(linear, value as u64)?;
            return self.write::<8>(linear.wrapping_add(8), (value >> 64) as u64);
        }
        let user = self.mmu.user;
        self.write_bytes(linear, &value.to_le_bytes(), user)
    }

    /// Reads with supervisor privilege regardless of CPL (descriptor tables, TSS, IDT).
    pub fn read_system<const B: usize>(&mut self, linear: u64) -> Result<u64, Event> {
        self.read_slow(linear, B, false)
    }

    /// Reads `size` (at most 8) bytes through the slow path.
    #[cold]
    #[inline(never)]
    pub fn read_slow(&mut self, linear: u64, size: usize, user: bool) -> Result<u64, Event> {
        let mut buf = [0u8; 8];
        self.read_bytes(linear, &mut buf[..size], user)?;
        Ok(u64::from_le_bytes(buf))
    }

    #[cold]
    #[inline(never)]
    fn write_slow(&mut self, linear: u64, data: &[u8], user: bool) -> Result<(), Event> {
        self.write_bytes(linear, data, user)
    }

    /// Reads any number of bytes (each page translated separately).
    pub fn read_bytes(&mut self, linear: u64, buf: &mut [u8], user: bool) -> Result<(), Event> {
        for (addr, range) in page_chunks(linear, buf.len()) {
            let phys = self.translate(addr, AccessKind::Read, user)?;
            self.mmu.mem.read(phys, &mut buf[range]);
            self.after_device_access();
        }
        Ok(())
    }

    /// Ends the block after the current instruction when a device it accessed asked for a
    /// machine reset or power-off: nothing after that instruction may run.
    #[inline]
    pub fn after_device_access(&mut self) {
        if self.mmu.mem.io().requests.pending().is_some() {
            self.break_block = true;
        }
    }

    /// Writes any number of bytes; every page is checked before anything is written.
    pub fn write_bytes(&mut self, linear: u64, data: &[u8], user: bool) -> Result<(), Event> {
        self.check_writable(linear, data.len(), user)?;
        for (addr, range) in page_chunks(linear, data.len()) {
            let phys = self.translate(addr, AccessKind::Write, user)?;
            self.write_phys(phys, &data[range]);
        }
        Ok(())
    }

    /// Checks that `len` bytes at `linear` may be written with the current privilege.
    pub fn check_writable_range(&mut self, linear: u64, len: usize) -> Result<(), Event> {
        let user = self.mmu.user;
        self.check_writable(linear, len, user)
    }

    /// Checks that every page of `linear..linear + len` may be written.
    fn check_writable(&mut self, linear: u64, len: usize, user: bool) -> Result<(), Event> {
        let mut page = linear & !PAGE_OFFSET_MASK;
        let last = linear.wrapping_add(len.max(1) as u64 - 1) & !PAGE_OFFSET_MASK;
        loop {
            let addr = if page == linear & !PAGE_OFFSET_MASK {
                linear
            } else {
                page
            };
            self.translate(addr, AccessKind::Write, user)?;
            if page == last {
                return Ok(());
            }
            page = page.wrapping_add(PAGE_SIZE);
        }
    }

    /// Writes guest-physical memory. The first write to a page with decoded code schedules
    /// all of that page's blocks for removal (at the end of the current block, which stops
    /// after this instruction) and makes the page ordinary data again, so the rest of a bulk
    /// write (clearing a freed page, say) runs at full speed.
    pub fn write_phys(&mut self, phys: u64, data: &[u8]) {
        let page = phys & !PAGE_OFFSET_MASK;
        if !self.mmu.code_pages.is_empty() && self.mmu.code_pages.remove(&page) {
            self.mmu.code_writes.push(page);
            self.break_block = true;
        }
        self.mmu.mem.write(phys, data);
        self.after_device_access();
    }

    /// Translates `linear` for `kind` at privilege `user`, filling the TLB.
    pub fn translate(&mut self, linear: u64, kind: AccessKind, user: bool) -> Result<u64, Event> {
        let entry = self.mmu.tlb.entry(linear, user);
        let tag = match kind {
            AccessKind::Read => entry.read,
            AccessKind::Write => entry.write,
            AccessKind::Execute => entry.exec,
        };
        if self.mmu.tlb.matches_slow(tag, linear) {
            let phys_page = entry.phys;
            if kind == AccessKind::Write
                && tag & crate::tlb::SLOW != 0
                && !self.mmu.code_pages.contains(&phys_page)
            {
                // Was slow because the page held code; it no longer does.
                if self.mmu.mem.host_page(phys_page).is_some() {
                    self.mmu.tlb.allow_fast_write(linear, user);
                }
            }
            return Ok(phys_page | (linear & PAGE_OFFSET_MASK));
        }
        self.translate_miss(linear, kind, user)
    }

    #[cold]
    fn translate_miss(&mut self, linear: u64, kind: AccessKind, user: bool) -> Result<u64, Event> {
        if !mmu::is_canonical(linear) {
            return Err(Event::non_canonical(linear));
        }
        self.stats.page_walks += 1;
        let translation = if self.paging_enabled() {
            match mmu::walk(&self.mmu.mem, &self.mmu.paging, linear, kind, user) {
                Ok(t) => t,
                Err(code) => return Err(Event::page_fault(linear, code)),
            }
        } else {
            mmu::Translation {
                phys: linear,
                page_size: PAGE_SIZE,
                writable: true,
                executable: true,
            }
        };
        let phys_page = translation.phys & !PAGE_OFFSET_MASK;
        let host = self.mmu.mem.host_page(phys_page);
        let rights = PageRights {
            read: true,
            write: translation.writable,
            exec: translation.executable,
            fast_read: true,
            fast_write: !self.mmu.code_pages.contains(&phys_page),
        };
        // SAFETY: `host_page` returns the host address of a whole 4 KiB page of RAM, which
        // `self.mmu.mem` keeps mapped for as long as this CPU (and its TLB) lives.
        unsafe {
            self.mmu
                .tlb
                .insert(linear, user, phys_page, host, rights, translation.page_size)
        };
        Ok(translation.phys)
    }
}
