//! The default guest image: built by the recipe in `guest/` (embedded in this binary, so
//! `lodge run` works from any directory) and cached outside the source tree by the recipe.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

/// The recipe's files, as `guest/build.sh` lists them.
const RECIPE: &[(&str, &str)] = &[
    ("build.sh", include_str!("../../../guest/build.sh")),
    (
        "kernel.fragment",
        include_str!("../../../guest/kernel.fragment"),
    ),
    ("init", include_str!("../../../guest/init")),
    ("mkdisk.sh", include_str!("../../../guest/mkdisk.sh")),
];

/// Kernel and initramfs of the default guest.
pub struct GuestImage {
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// Builds the default guest image, or finds it in the cache (the recipe answers a cache hit
/// in well under a second). The recipe's progress goes to stderr.
pub fn default_image() -> anyhow::Result<GuestImage> {
    let recipe = tempfile::Builder::new()
        .prefix("lodge-guest-recipe")
        .tempdir()
        .context("Cannot create a directory for the guest image recipe")?;
    for (name, text) in RECIPE {
        std::fs::write(recipe.path().join(name), text)
            .with_context(|| format!("Cannot write the guest recipe file {name}"))?;
    }
    let output = Command::new("bash")
        .arg(recipe.path().join("build.sh"))
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("Cannot run the guest image recipe (bash)")?;
    if !output.status.success() {
        bail!("The default guest image could not be built (see the recipe's messages above)");
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let dir = stdout
        .lines()
        .last()
        .map(PathBuf::from)
        .context("The guest image recipe printed no output directory")?;
    image_in(&dir)
}

/// The image in a recipe output directory.
fn image_in(dir: &Path) -> anyhow::Result<GuestImage> {
    let image = GuestImage {
        kernel: dir.join("vmlinux"),
        initrd: dir.join("initramfs.cpio.gz"),
        dir: dir.to_owned(),
    };
    for file in [&image.kernel, &image.initrd] {
        if !file.is_file() {
            bail!("The guest image recipe did not produce {}", file.display());
        }
    }
    Ok(image)
}
