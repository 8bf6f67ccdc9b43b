//! The default guest image: built by the recipe in `guest/` (embedded in this binary) and
//! cached outside the source tree.

use std::path::PathBuf;

/// Kernel and initramfs of the default guest.
pub struct GuestImage {
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// Builds the default guest image, or finds it in the cache.
pub fn default_image() -> anyhow::Result<GuestImage> {
    anyhow::bail!("The default guest image recipe is not part of this build yet")
}
