use std::io::Write;

use linux_loader::loader::bootparam::boot_params;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::layout::{EBDA_START, ZERO_PAGE_START};
use crate::memory::allocate;

fn tiny_vmlinux(code: &[u8]) -> Vec<u8> {
    lodge_testkit::vmlinux_from_code(code)
}

/// What to boot.
struct BootSource {
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    cmdline: String,
}

/// Both boot steps, as `Machine::build` takes them.
fn load(
    memory: &GuestMemoryMmap,
    source: &BootSource,
    mp_table_vcpus: Option<u8>,
) -> Result<(LoadedKernel, CpuState), BootError> {
    let loaded = load_images(memory, &source.kernel, source.initrd.as_deref())?;
    let state = write_boot_parameters(memory, &loaded, &source.cmdline, mp_table_vcpus)?;
    Ok((loaded, state))
}

fn file_with(bytes: &[u8]) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(bytes).unwrap();
    file
}

#[test]
fn loads_an_elf_kernel_initrd_and_zero_page() {
    let memory = allocate(64 << 20).unwrap();
    let kernel = file_with(&tiny_vmlinux(&[0xf4, 0xeb, 0xfd]));
    let initrd = file_with(&[0x5a; 10_000]);
    let source = BootSource {
        kernel: kernel.path().to_owned(),
        initrd: Some(initrd.path().to_owned()),
        cmdline: "console=ttyS0 reboot=k".into(),
    };
    let (loaded, boot_state) = load(&memory, &source, Some(1)).unwrap();

    assert_eq!(boot_state.regs.rip, 0x100_0000);
    let mut code = [0u8; 3];
    memory
        .read_slice(&mut code, GuestAddress(0x100_0000))
        .unwrap();
    assert_eq!(code, [0xf4, 0xeb, 0xfd]);

    let (initrd_start, initrd_size) = loaded.initrd.unwrap();
    assert_eq!(initrd_size, 10_000);
    assert_eq!(initrd_start % 4096, 0);
    assert!(initrd_start + initrd_size <= 64 << 20);
    assert_eq!(
        memory
            .read_obj::<u8>(GuestAddress(initrd_start + 9_999))
            .unwrap(),
        0x5a
    );

    let params: boot_params = memory.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
    assert_eq!({ params.hdr.boot_flag }, 0xaa55);
    assert_eq!({ params.hdr.header }, 0x5372_6448);
    assert_eq!({ params.hdr.type_of_loader }, 0xff);
    assert_eq!({ params.hdr.cmd_line_ptr }, CMDLINE_START as u32);
    assert_eq!({ params.hdr.ramdisk_image }, initrd_start as u32);
    assert_eq!({ params.hdr.ramdisk_size }, 10_000);
    let mut cmdline = vec![0u8; source.cmdline.len() + 1];
    memory
        .read_slice(&mut cmdline, GuestAddress(CMDLINE_START))
        .unwrap();
    assert_eq!(&cmdline[..source.cmdline.len()], source.cmdline.as_bytes());
    assert_eq!(cmdline[source.cmdline.len()], 0);

    let mut mp = [0u8; 4];
    memory
        .read_slice(&mut mp, GuestAddress(EBDA_START))
        .unwrap();
    assert_eq!(&mp, b"_MP_");
}

#[test]
fn e820_covers_ram_and_reserves_the_bios_area() {
    let memory = allocate(64 << 20).unwrap();
    let map = e820_map(&memory);
    let entries: Vec<(u64, u64, u32)> = map.iter().map(|e| (e.addr, e.size, e.r#type)).collect();
    assert_eq!(
        entries,
        vec![
            (0, EBDA_START, 1),
            (EBDA_START, 0x10_0000 - EBDA_START, 2),
            (0x10_0000, (64 << 20) - 0x10_0000, 1),
        ]
    );
}

#[test]
fn e820_lists_memory_above_4g() {
    let memory = allocate((3 << 30) + (256 << 20)).unwrap();
    let map = e820_map(&memory);
    let last = map.last().unwrap();
    assert_eq!((last.addr, last.size, last.r#type), (1 << 32, 256 << 20, 1));
}

#[test]
fn rejects_an_initrd_that_does_not_fit() {
    let memory = allocate(64 << 20).unwrap();
    let kernel = file_with(&tiny_vmlinux(&[0xf4]));
    let initrd = file_with(&vec![0u8; 60 << 20]);
    let source = BootSource {
        kernel: kernel.path().to_owned(),
        initrd: Some(initrd.path().to_owned()),
        cmdline: String::new(),
    };
    assert!(matches!(
        load(&memory, &source, None),
        Err(BootError::InitrdTooLarge { .. })
    ));
}

#[test]
fn rejects_garbage_kernels_and_bad_cmdlines() {
    let memory = allocate(64 << 20).unwrap();
    let garbage = file_with(&[0x42; 8192]);
    let mut source = BootSource {
        kernel: garbage.path().to_owned(),
        initrd: None,
        cmdline: String::new(),
    };
    assert!(matches!(
        load(&memory, &source, None),
        Err(BootError::LoadKernel { .. })
    ));
    source.kernel = "/nonexistent/vmlinux".into();
    assert!(matches!(
        load(&memory, &source, None),
        Err(BootError::OpenKernel { .. })
    ));
    let kernel = file_with(&tiny_vmlinux(&[0xf4]));
    source.kernel = kernel.path().to_owned();
    source.cmdline = "x".repeat(4096);
    assert!(matches!(
        load(&memory, &source, None),
        Err(BootError::InvalidCmdline(_))
    ));
    source.cmdline = "a\0b".into();
    assert!(matches!(
        load(&memory, &source, None),
        Err(BootError::InvalidCmdline(_))
    ));
}

#[test]
fn rejects_a_kernel_larger_than_memory() {
    let memory = allocate(64 << 20).unwrap();
    // A segment ending past the end of guest RAM.
    let mut elf = tiny_vmlinux(&[0xf4]);
    let ph = 0x40;
    elf[ph + 40..ph + 48].copy_from_slice(&(128u64 << 20).to_le_bytes()); // p_memsz
    let kernel = file_with(&elf);
    let source = BootSource {
        kernel: kernel.path().to_owned(),
        initrd: None,
        cmdline: String::new(),
    };
    assert!(matches!(
        load(&memory, &source, None),
        Err(BootError::KernelTooLarge { .. })
    ));
}
