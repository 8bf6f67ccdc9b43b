#!/usr/bin/env bash
# Make a sparse ext4 disk image for a lodge guest, without loop mounts or root.
#
# Usage: bash mkdisk.sh OUT SIZE [SOURCE_DIR] [LABEL]
#   OUT         image file to write (replaced if it exists)
#   SIZE        image size as truncate(1) takes it: 64M, 2G, 1073741824, ...
#   SOURCE_DIR  copy this directory's contents into the file system (mkfs.ext4 -d)
#   LABEL       file system label, at most 16 bytes (default: lodge)
#
# The root directory is owned by 0:0; files from SOURCE_DIR keep their owners and modes, so
# run as root (or fix them afterwards) when the guest must see them owned by root. Prints the
# image's absolute path as the last line of stdout. The image is written beside OUT and renamed
# into place, so OUT is never a half-made file system.
set -euo pipefail

die() {
	echo "mkdisk.sh: error: $*" >&2
	exit 1
}

[[ $# -ge 2 && $# -le 4 ]] || die "usage: mkdisk.sh OUT SIZE [SOURCE_DIR] [LABEL]"
out=$1
size=$2
source_dir=${3:-}
label=${4:-lodge}

[[ -n $out ]] || die "OUT is empty"
[[ $size =~ ^[1-9][0-9]*[KMGT]?$ ]] || die "SIZE '$size' is not a positive size such as 64M or 2G"
if [[ -n $source_dir && ! -d $source_dir ]]; then
	die "SOURCE_DIR '$source_dir' is not a directory"
fi
((${#label} <= 16)) || die "LABEL '$label' is longer than 16 bytes"

PATH=$PATH:/usr/sbin:/sbin
command -v mkfs.ext4 >/dev/null || die "mkfs.ext4 not found (install e2fsprogs)"

out_dir=$(cd "$(dirname -- "$out")" 2>/dev/null && pwd -P) ||
	die "directory of '$out' does not exist"
out=$out_dir/$(basename -- "$out")
partial=$(mktemp "$out.partial.XXXXXX")
trap 'rm -f -- "$partial"' EXIT

truncate -s 0 -- "$partial"
truncate -s "$size" -- "$partial" # sparse: only what mkfs writes takes space
args=(-q -F -L "$label" -E root_owner=0:0)
[[ -n $source_dir ]] && args+=(-d "$source_dir")
mkfs.ext4 "${args[@]}" "$partial" >&2 || die "mkfs.ext4 failed for '$out' (size $size)"
chmod 0644 -- "$partial"
mv -f -- "$partial" "$out"
trap - EXIT
echo "$out"
