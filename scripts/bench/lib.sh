# Shared by the scripts that need a throwaway pool filesystem (sourced, not
# run): a loop-mounted xfs with reflink under a work directory, and a
# clean-up that removes everything under it however the script ends.

# scratch_fs WORK SIZE [FS]: a filesystem of SIZE (truncate syntax) mounted
# at WORK/mnt: xfs with reflink (the default) or ext4 (no reflink).
scratch_fs() {
  truncate -s "$2" "$1/fs.img"
  case ${3:-xfs} in
    xfs) mkfs.xfs -q -m reflink=1 "$1/fs.img" ;;
    ext4) mkfs.ext4 -q -F "$1/fs.img" ;;
    *) echo "scratch_fs: unknown filesystem $3" >&2; return 1 ;;
  esac
  mkdir -p "$1/mnt"
  mount -o loop "$1/fs.img" "$1/mnt"
}

# scratch_cleanup WORK: detaches every loop device backed by a file under
# WORK (a driver's block volumes, attached on the scratch filesystem, keep
# it busy: detached first, while their paths still read as under WORK),
# unmounts everything under WORK (deepest first), detaches the scratch
# filesystem's own device, removes it all.
scratch_detach() {
  local f
  for f in /sys/block/loop*/loop/backing_file; do
    [[ -r $f ]] && grep -q "^$1/" "$f" 2>/dev/null &&
      losetup -d "/dev/$(basename "$(dirname "$(dirname "$f")")")" 2>/dev/null
  done
  return 0
}
scratch_cleanup() {
  scratch_detach "$1"
  awk -v d="$1/" 'index($5, d) == 1 {print length($5), $5}' /proc/self/mountinfo |
    sort -rn | cut -d' ' -f2- | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  scratch_detach "$1"
  rm -rf "$1"
}
