//! The software TLB: linear page → physical page and, for RAM, host address.
//!
//! Direct-mapped, one table per privilege (supervisor and user see different permissions).
//! Each entry holds one tag per access kind; a tag matches only when the page may be accessed
//! that way *and* a plain host memory access is correct. Pages that must take the slow path
//! every time (MMIO, and writes to pages holding decoded code) keep a tag with [`SLOW`] set: the
//! fast comparison fails, but the slow path still finds the cached translation without walking.
//!
//! Flushing everything is O(1): tags carry a generation number that a flush increments.

/// Entries per table.
pub const TLB_ENTRIES: usize = 1024;
const TAG_GENERATION_MASK: u64 = 0x7ff;
/// Set in a tag whose page is valid but must not be accessed through the host address.
pub const SLOW: u64 = 0x800;
/// Large pages remembered between flushes; past that, any INVLPG flushes everything.
const MAX_LARGE_PAGES: usize = 64;
/// A tag no lookup matches (non-canonical page with generation 0, which is never used).
const INVALID: u64 = 0x0000_8000_0000_0000;

/// One cached translation.
#[derive(Clone, Copy, Debug)]
pub struct TlbEntry {
    pub read: u64,
    pub write: u64,
    pub exec: u64,
    /// Host address minus linear page address (wrapping); meaningful for RAM pages.
    pub addend: u64,
    /// Physical address of the page.
    pub phys: u64,
}

impl TlbEntry {
    const EMPTY: TlbEntry = TlbEntry {
        read: INVALID,
        write: INVALID,
        exec: INVALID,
        addend: 0,
        phys: 0,
    };
}

/// Permissions of a page being inserted.
#[derive(Clone, Copy, Debug)]
pub struct PageRights {
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    /// Reads may use the host address (RAM).
    pub fast_read: bool,
    /// Writes may use the host address (RAM without decoded code).
    pub fast_write: bool,
}

/// Both privilege levels' tables.
pub struct Tlb {
    /// A fixed-size array, so the masked index needs no bounds check on the fast path.
    entries: Box<[TlbEntry; 2 * TLB_ENTRIES]>,
    generation: u64,
    /// Full flushes so far.
    pub flushes: u64,
    /// Flushes of any extent (full or INVLPG) so far: translations cached elsewhere (block
    /// links) are valid only while this stays the same.
    pub changes: u64,
    /// 2 MiB / 1 GiB mappings cached as 4 KiB entries: an INVLPG inside one flushes everything.
    large_pages: Vec<(u64, u64)>,
    /// More large pages were cached than `large_pages` holds.
    large_pages_overflowed: bool,
}

impl Default for Tlb {
    fn default() -> Self {
        Self::new()
    }
}

impl Tlb {
    pub fn new() -> Self {
        Tlb {
            entries: Box::new([TlbEntry::EMPTY; 2 * TLB_ENTRIES]),
            generation: 1,
            flushes: 0,
            changes: 0,
            large_pages: Vec::new(),
            large_pages_overflowed: false,
        }
    }

    /// The tag a valid entry for `linear` has in the current generation.
    #[inline(always)]
    pub fn tag(&self, linear: u64) -> u64 {
        (linear & !0xfff) | self.generation
    }

    /// The slot for `linear` at privilege `user`.
    #[inline(always)]
    pub fn index(linear: u64, user: bool) -> usize {
        ((linear >> 12) as usize & (TLB_ENTRIES - 1)) | ((user as usize) * TLB_ENTRIES)
    }

    /// The entry for `linear` (whether or not it matches).
    #[inline(always)]
    pub fn entry(&self, linear: u64, user: bool) -> &TlbEntry {
        // The index is masked to the table size.
        &self.entries[Self::index(linear, user)]
    }

    /// Caches a translation of the page holding `linear`.
    ///
    /// # Safety
    /// `host_page`, if given, must be the host address of the 4 KiB of RAM at `phys_page`,
    /// mapped for as long as the TLB is used: `Cpu::read` and `Cpu::write` access guest
    /// memory through it without further checks.
    pub unsafe fn insert(
        &mut self,
        linear: u64,
        user: bool,
        phys_page: u64,
        host_page: Option<usize>,
        rights: PageRights,
        page_size: u64,
    ) {
        let tag = self.tag(linear);
        let slow = |allowed: bool, fast: bool| match (allowed, fast) {
            (false, _) => INVALID,
            (true, true) => tag,
            (true, false) => tag | SLOW,
        };
        let has_host = host_page.is_some();
        let entry = TlbEntry {
            read: slow(rights.read, rights.fast_read && has_host),
            write: slow(rights.write, rights.fast_write && has_host),
            exec: slow(rights.exec, has_host),
            addend: host_page.map_or(0, |h| (h as u64).wrapping_sub(linear & !0xfff)),
            phys: phys_page,
        };
        self.entries[Self::index(linear, user)] = entry;
        if page_size > 4096 {
            let base = linear & !(page_size - 1);
            if self.large_pages_overflowed || self.large_pages.contains(&(base, page_size)) {
                // Already covered.
            } else if self.large_pages.len() < MAX_LARGE_PAGES {
                self.large_pages.push((base, page_size));
            } else {
                // A guest touching many large pages between flushes would make this list
                // (and every insert's search of it) grow without bound.
                self.large_pages_overflowed = true;
            }
        }
    }

    /// Whether `tag` (from an entry) is valid for `linear`, fast or slow.
    #[inline(always)]
    pub fn matches_slow(&self, tag: u64, linear: u64) -> bool {
        tag & !SLOW == self.tag(linear)
    }

    /// Drops every entry.
    pub fn flush(&mut self) {
        self.flushes += 1;
        self.changes += 1;
        self.large_pages.clear();
        self.large_pages_overflowed = false;
        self.generation += 1;
        if self.generation > TAG_GENERATION_MASK {
            self.entries.fill(TlbEntry::EMPTY);
            self.generation = 1;
        }
    }

    /// Drops the translation of the page holding `linear` (INVLPG).
    pub fn flush_page(&mut self, linear: u64) {
        self.changes += 1;
        if self.large_pages_overflowed
            || self
                .large_pages
                .iter()
                .any(|&(base, size)| linear.wrapping_sub(base) < size)
        {
            self.flush();
            return;
        }
        for user in [false, true] {
            self.entries[Self::index(linear, user)] = TlbEntry::EMPTY;
        }
    }

    /// Gives the entry for `linear` fast writes again (its page no longer holds code).
    pub fn allow_fast_write(&mut self, linear: u64, user: bool) {
        let tag = self.tag(linear);
        let entry = &mut self.entries[Self::index(linear, user)];
        if entry.write == tag | SLOW {
            entry.write = tag;
        }
    }

    /// Removes fast write access to physical page `phys_page` (it now holds decoded code).
    pub fn protect_code_page(&mut self, phys_page: u64) {
        for e in self.entries.iter_mut() {
            if e.phys == phys_page && e.write & SLOW == 0 && e.write != INVALID {
                e.write |= SLOW;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RW: PageRights = PageRights {
        read: true,
        write: true,
        exec: false,
        fast_read: true,
        fast_write: true,
    };

    /// Inserts an entry whose host address the test never dereferences.
    fn insert(
        tlb: &mut Tlb,
        linear: u64,
        user: bool,
        phys: u64,
        host: Option<usize>,
        rights: PageRights,
        size: u64,
    ) {
        // SAFETY: nothing accesses memory through a TLB outside a `Cpu`.
        unsafe { tlb.insert(linear, user, phys, host, rights, size) }
    }

    #[test]
    fn hits_until_flushed() {
        let mut tlb = Tlb::new();
        insert(
            &mut tlb,
            0x7000_1234,
            false,
            0x5000,
            Some(0x1_0000),
            RW,
            4096,
        );
        let e = *tlb.entry(0x7000_1ff8, false);
        assert_eq!(e.read, tlb.tag(0x7000_1ff8));
        assert_eq!(e.exec & !SLOW, INVALID & !SLOW);
        assert_eq!(0x7000_1ff8u64.wrapping_add(e.addend), 0x1_0ff8);
        assert_ne!(
            tlb.entry(0x7000_1000, true).read,
            tlb.tag(0x7000_1000),
            "user table is separate"
        );
        tlb.flush();
        assert_ne!(tlb.entry(0x7000_1000, false).read, tlb.tag(0x7000_1000));
    }

    #[test]
    fn invlpg_in_a_large_page_flushes_all() {
        let mut tlb = Tlb::new();
        insert(
            &mut tlb,
            0x20_3000,
            false,
            0x3000,
            Some(0x1000),
            RW,
            0x20_0000,
        );
        insert(&mut tlb, 0x80_0000, false, 0x9000, Some(0x2000), RW, 4096);
        tlb.flush_page(0x80_0000);
        assert_ne!(tlb.entry(0x80_0000, false).read, tlb.tag(0x80_0000));
        assert_eq!(tlb.entry(0x20_3000, false).read, tlb.tag(0x20_3000));
        tlb.flush_page(0x21_0000);
        assert_ne!(tlb.entry(0x20_3000, false).read, tlb.tag(0x20_3000));
    }

    #[test]
    fn invlpg_flushes_all_once_too_many_large_pages_were_cached() {
        let mut tlb = Tlb::new();
        insert(&mut tlb, 0x1000, false, 0x1000, Some(0x1000), RW, 4096);
        for i in 0..=MAX_LARGE_PAGES as u64 {
            let base = 0x4000_0000 + i * 0x20_0000;
            insert(&mut tlb, base, false, base, Some(0x2000), RW, 0x20_0000);
        }
        assert!(tlb.large_pages.len() <= MAX_LARGE_PAGES);
        let flushes = tlb.flushes;
        tlb.flush_page(0x7000_0000);
        assert_eq!(tlb.flushes, flushes + 1);
        assert_ne!(tlb.entry(0x1000, false).read, tlb.tag(0x1000));
        // A flush starts the bookkeeping over.
        insert(&mut tlb, 0x1000, false, 0x1000, Some(0x1000), RW, 4096);
        tlb.flush_page(0x7000_0000);
        assert_eq!(tlb.entry(0x1000, false).read, tlb.tag(0x1000));
    }

    #[test]
    fn code_pages_lose_fast_writes() {
        let mut tlb = Tlb::new();
        insert(&mut tlb, 0x1000, true, 0x8000, Some(0x1000), RW, 4096);
        tlb.protect_code_page(0x8000);
        let e = *tlb.entry(0x1000, true);
        assert_ne!(e.write, tlb.tag(0x1000));
        assert!(tlb.matches_slow(e.write, 0x1000));
        assert_eq!(e.read, tlb.tag(0x1000));
    }

    #[test]
    fn generations_wrap() {
        let mut tlb = Tlb::new();
        for _ in 0..5000 {
            insert(&mut tlb, 0x1000, false, 0, Some(0x1000), RW, 4096);
            assert_eq!(tlb.entry(0x1000, false).read, tlb.tag(0x1000));
            tlb.flush();
            assert_ne!(tlb.entry(0x1000, false).read, tlb.tag(0x1000));
        }
    }
}
