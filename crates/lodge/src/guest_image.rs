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
    let dir = run_recipe(RECIPE, "build.sh", &[], "The default guest image")?;
    image_in(&dir)
}

/// Writes the embedded recipe `files` to a temporary directory, runs `bash SCRIPT ARGS...`
/// there with its progress on stderr, and returns the path its last stdout line names
/// (the contract every recipe in `guest/` follows). `what` names the result in errors.
pub fn run_recipe(
    files: &[(&str, &str)],
    script: &str,
    args: &[std::ffi::OsString],
    what: &str,
) -> anyhow::Result<PathBuf> {
    let recipe = tempfile::Builder::new()
        .prefix("lodge-recipe")
        .tempdir()
        .context("Cannot create a directory for the recipe")?;
    for (name, text) in files {
        std::fs::write(recipe.path().join(name), text)
            .with_context(|| format!("Cannot write the recipe file {name}"))?;
    }
    let output = Command::new("bash")
        .arg(recipe.path().join(script))
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("Cannot run the recipe (bash)")?;
    if !output.status.success() {
        bail!("{what} could not be built (see the recipe's messages above)");
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .last()
        .map(PathBuf::from)
        .with_context(|| format!("The recipe for {what} printed no path"))
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
