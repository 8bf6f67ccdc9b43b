//! Root file system images for distribution guests: `lodge image create debian` and the
//! `--image` of `lodge run` (and, through the VMM binary, of `lodge vm create`).
//!
//! The recipe is `guest/debian.sh`, embedded in this binary like the default guest's recipe;
//! it caches finished images by their inputs and prints the image's path.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

use crate::guest_image::run_recipe;

/// The Debian image recipe.
const DEBIAN_RECIPE: &str = include_str!("../../../guest/debian.sh");

/// `lodge image ...`.
#[derive(Args, Debug)]
pub struct ImageArgs {
    #[command(subcommand)]
    command: ImageCommand,
}

#[derive(Subcommand, Debug)]
enum ImageCommand {
    /// Build (or find in the cache) a root file system image and print its path.
    Create(CreateArgs),
}

/// `lodge image create debian ...`.
#[derive(Args, Debug, Default, Clone)]
pub struct CreateArgs {
    /// The distribution: debian.
    distribution: String,
    /// Debian suite.
    #[arg(long, default_value = "bookworm")]
    suite: String,
    /// Image size (sparse), e.g. 4G.
    #[arg(long, default_value = "4G")]
    size: String,
    /// Extra Debian packages, comma-separated.
    #[arg(long, value_name = "LIST")]
    packages: Option<String>,
    /// Write the image here instead of only to the cache.
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
}

/// Runs `lodge image`.
pub fn run(args: ImageArgs) -> anyhow::Result<()> {
    match args.command {
        ImageCommand::Create(create) => {
            let path = create_image(&create)?;
            println!("{}", path.display());
            Ok(())
        }
    }
}

/// Builds the image `args` describe, or finds it in the cache; returns its path (the cache
/// entry, which must not be written to, unless `args.output` names a file).
pub fn create_image(args: &CreateArgs) -> anyhow::Result<PathBuf> {
    if args.distribution != "debian" {
        bail!(
            "Unknown distribution '{}' (lodge builds: debian)",
            args.distribution
        );
    }
    let mut recipe_args: Vec<std::ffi::OsString> = vec![
        "--suite".into(),
        args.suite.clone().into(),
        "--size".into(),
        args.size.clone().into(),
    ];
    if let Some(packages) = &args.packages {
        recipe_args.extend(["--packages".into(), packages.clone().into()]);
    }
    if let Some(output) = &args.output {
        recipe_args.extend(["--output".into(), output.clone().into()]);
    }
    let what = format!("The {} image", args.distribution);
    let path = run_recipe(
        &[("debian.sh", DEBIAN_RECIPE)],
        "debian.sh",
        &recipe_args,
        &what,
    )?;
    if !path.is_file() {
        bail!("The image recipe did not produce {}", path.display());
    }
    Ok(path)
}

/// What `--image` names: a distribution lodge builds (a private copy of the cached image is
/// made for the VM) or an image file used in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootImage {
    Distribution(String),
    File(PathBuf),
}

impl RootImage {
    /// `debian`, or a path (anything with a `/` or an existing file).
    pub fn parse(text: &str) -> RootImage {
        if text.contains('/') || std::path::Path::new(text).is_file() {
            RootImage::File(PathBuf::from(text))
        } else {
            RootImage::Distribution(text.to_owned())
        }
    }
}

/// A VM's copy of a distribution image, removed when dropped.
pub struct PrivateCopy {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

/// Makes a private, sparse copy of the cached `distribution` image for one `lodge run`.
pub fn private_copy(distribution: &str) -> anyhow::Result<PrivateCopy> {
    let cached = create_image(&CreateArgs {
        distribution: distribution.to_owned(),
        suite: "bookworm".into(),
        size: "4G".into(),
        ..CreateArgs::default()
    })?;
    let dir = tempfile::Builder::new()
        .prefix("lodge-run-image")
        .tempdir_in(cached.parent().and_then(|p| p.parent()).unwrap_or(&cached))
        .context("Cannot create a directory for the VM's image copy")?;
    let path = dir.path().join("rootfs.ext4");
    let status = Command::new("cp")
        .args(["--sparse=always", "--reflink=auto"])
        .arg(&cached)
        .arg(&path)
        .status()
        .context("Cannot run cp")?;
    if !status.success() {
        bail!("Cannot copy {} to {}", cached.display(), path.display());
    }
    Ok(PrivateCopy { path, _dir: dir })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names_and_paths() {
        assert_eq!(
            RootImage::parse("debian"),
            RootImage::Distribution("debian".into())
        );
        assert_eq!(
            RootImage::parse("./disk.ext4"),
            RootImage::File("./disk.ext4".into())
        );
        assert_eq!(
            RootImage::parse("/var/lib/x.img"),
            RootImage::File("/var/lib/x.img".into())
        );
    }

    #[test]
    fn unknown_distributions_are_refused_before_anything_runs() {
        let error = create_image(&CreateArgs {
            distribution: "fedora".into(),
            ..CreateArgs::default()
        })
        .unwrap_err();
        assert!(
            error.to_string().contains("Unknown distribution"),
            "{error}"
        );
    }
}
