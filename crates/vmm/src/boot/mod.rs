//! x86-64 Linux boot: load the kernel and initrd, write the command line, zero page, boot
//! page tables and (for APIC guests) the MP table, and produce the vCPU's entry state.

pub mod mptable;
pub mod paging;
mod zero_page;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use lodge_engine::CpuState;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::layout::{
    BZIMAGE_LOAD_ADDRESS, CMDLINE_MAX_SIZE, CMDLINE_START, HIGH_MEMORY_START, INITRD_ADDRESS_MAX,
    MMIO_GAP_START,
};

pub use zero_page::e820_map;

/// Errors from preparing the guest for boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel image cannot be opened.
    #[error("Cannot open kernel {path}")]
    OpenKernel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The kernel is neither a vmlinux ELF nor a bzImage, or does not fit in memory.
    #[error("Cannot load kernel {path}")]
    LoadKernel {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The kernel (with its bss, or a bzImage's decompression space) ends past low RAM.
    #[error("Kernel needs memory up to {end:#x}, beyond the guest's low RAM ({memory_end:#x})")]
    KernelTooLarge { end: u64, memory_end: u64 },
    /// A bzImage without the 64-bit entry point.
    #[error("Kernel {0} has no 64-bit entry point (XLF_KERNEL_64)")]
    No64BitEntry(PathBuf),
    /// The initrd cannot be read.
    #[error("Cannot read initrd {path}")]
    ReadInitrd {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The initrd does not fit between the kernel and the top of low memory.
    #[error("Initrd of {size} bytes does not fit in guest memory above the kernel")]
    InitrdTooLarge { size: u64 },
    /// The command line is too long or contains a NUL byte.
    #[error("Kernel command line is invalid: {0}")]
    InvalidCmdline(String),
    /// Writing boot structures to guest memory failed.
    #[error("Cannot write {what} to guest memory")]
    Write {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error(transparent)]
    Paging(#[from] paging::PagingError),
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
}

/// Where the kernel and initrd landed.
#[derive(Debug, Clone)]
pub struct LoadedKernel {
    pub kernel_start: u64,
    pub kernel_end: u64,
    /// The 64-bit entry point.
    pub entry: u64,
    /// Start and size of the initrd.
    pub initrd: Option<(u64, u64)>,
    /// A bzImage's setup header (vmlinux kernels have none).
    header: Option<setup_header>,
}

/// Places the kernel and the initrd in guest memory. The VMM then builds its devices (which
/// add to the command line) before [`write_boot_parameters`].
pub fn load_images(
    memory: &GuestMemoryMmap,
    kernel: &Path,
    initrd: Option<&Path>,
) -> Result<LoadedKernel, BootError> {
    let image = load_kernel(memory, kernel)?;
    let memory_end = low_memory_end(memory);
    if image.end > memory_end {
        return Err(BootError::KernelTooLarge {
            end: image.end,
            memory_end,
        });
    }
    let initrd = match initrd {
        Some(path) => Some(load_initrd(
            memory,
            path,
            image.end,
            image.initrd_address_max,
        )?),
        None => None,
    };
    Ok(LoadedKernel {
        kernel_start: image.start,
        kernel_end: image.end,
        entry: image.entry,
        initrd,
        header: image.header,
    })
}

/// Writes the command line, zero page, boot page tables and GDT, and the MP table when
/// `mp_table_vcpus` is given; returns the boot vCPU's entry state.
pub fn write_boot_parameters(
    memory: &GuestMemoryMmap,
    loaded: &LoadedKernel,
    cmdline: &str,
    mp_table_vcpus: Option<u8>,
) -> Result<CpuState, BootError> {
    validate_cmdline(cmdline)?;
    write_cmdline(memory, cmdline)?;
    zero_page::write(memory, loaded.header, cmdline.len(), loaded.initrd)?;
    paging::write_tables(memory)?;
    if let Some(vcpus) = mp_table_vcpus {
        mptable::write(memory, vcpus)?;
    }
    Ok(paging::boot_cpu_state(loaded.entry))
}

struct KernelImage {
    start: u64,
    end: u64,
    entry: u64,
    header: Option<setup_header>,
    initrd_address_max: u64,
}

/// Loads a vmlinux ELF (entered at `e_entry`) or a bzImage (entered at its 64-bit
/// `startup_64`, 0x200 past the protected-mode code).
fn load_kernel(memory: &GuestMemoryMmap, path: &Path) -> Result<KernelImage, BootError> {
    let open_error = |source| BootError::OpenKernel {
        path: path.to_owned(),
        source,
    };
    let load_error = |source| BootError::LoadKernel {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(open_error)?;
    let mut magic = [0u8; 4];
    file.read_exact(&mut magic).map_err(open_error)?;
    file.seek(SeekFrom::Start(0)).map_err(open_error)?;

    if magic == *b"\x7fELF" {
        let result = Elf::load(
            memory,
            None,
            &mut file,
            Some(GuestAddress(HIGH_MEMORY_START)),
        )
        .map_err(load_error)?;
        return Ok(KernelImage {
            start: result.kernel_load.raw_value(),
            end: result.kernel_end,
            entry: result.kernel_load.raw_value(),
            header: None,
            initrd_address_max: INITRD_ADDRESS_MAX,
        });
    }

    let result = BzImage::load(
        memory,
        Some(GuestAddress(BZIMAGE_LOAD_ADDRESS)),
        &mut file,
        Some(GuestAddress(HIGH_MEMORY_START)),
    )
    .map_err(load_error)?;
    let header = result.setup_header.ok_or_else(|| {
        load_error(linux_loader::loader::Error::Bzimage(
            linux_loader::loader::bzimage::Error::InvalidBzImage,
        ))
    })?;
    const XLF_KERNEL_64: u16 = 1;
    if header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::No64BitEntry(path.to_owned()));
    }
    // The decompressor needs `init_size` bytes from the load address, beyond the image.
    let end = BZIMAGE_LOAD_ADDRESS
        .saturating_add(u64::from(header.init_size))
        .max(result.kernel_end);
    let initrd_address_max = match header.initrd_addr_max {
        0 => INITRD_ADDRESS_MAX,
        max => u64::from(max),
    };
    Ok(KernelImage {
        start: BZIMAGE_LOAD_ADDRESS,
        end,
        entry: BZIMAGE_LOAD_ADDRESS + 0x200,
        header: Some(header),
        initrd_address_max,
    })
}

/// Places the initrd as high as it may go in low memory, page aligned, above the kernel.
fn load_initrd(
    memory: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    address_max: u64,
) -> Result<(u64, u64), BootError> {
    let read_error = |source| BootError::ReadInitrd {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(read_error)?;
    let size = file.metadata().map_err(read_error)?.len();
    let top = low_memory_end(memory).min(address_max.saturating_add(1));
    let start = top
        .checked_sub(size)
        .map(|start| start & !0xfff)
        .filter(|start| *start >= kernel_end)
        .ok_or(BootError::InitrdTooLarge { size })?;
    memory
        .read_exact_volatile_from(GuestAddress(start), &mut file, size as usize)
        .map_err(|source| BootError::Write {
            what: "the initrd",
            source,
        })?;
    Ok((start, size))
}

/// End of the RAM region starting at 0 (RAM above 4 GiB is not usable for boot data).
fn low_memory_end(memory: &GuestMemoryMmap) -> u64 {
    memory.last_addr().raw_value().min(MMIO_GAP_START - 1) + 1
}

fn validate_cmdline(cmdline: &str) -> Result<(), BootError> {
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(BootError::InvalidCmdline(format!(
            "{} bytes long (at most {})",
            cmdline.len(),
            CMDLINE_MAX_SIZE - 1
        )));
    }
    if cmdline.contains('\0') {
        return Err(BootError::InvalidCmdline("contains a NUL byte".into()));
    }
    Ok(())
}

fn write_cmdline(memory: &GuestMemoryMmap, cmdline: &str) -> Result<(), BootError> {
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    memory
        .write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(|source| BootError::Write {
            what: "the command line",
            source,
        })
}

#[cfg(test)]
mod tests;
