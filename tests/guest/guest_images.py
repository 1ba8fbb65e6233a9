#!/usr/bin/env python3
"""Build and cache the test guest: an ELF vmlinux and an uncompressed initramfs.

The kernel comes from the unpacked Debian package under BLKGRAPH_GUEST_DIR
(default /var/cache/blkgraph-guest, filled by .ci/install-deps).  The outputs
go to BLKGRAPH_GUEST_CACHE (default $BLKGRAPH_GUEST_DIR/build) and are rebuilt
only when an input changes: this script, init.sh, the kernel, the modules,
busybox, fio or one of fio's shared libraries.

The initramfs holds static busybox, /init (init.sh), fio with its ldd closure
and the modules the guest needs (virtio_blk, qemu_fw_cfg and their
dependencies), decompressed.  The vmlinux is taken out of the bzImage so QEMU
boots it through its PVH note, skipping the decompressor.
"""

import fcntl
import hashlib
import os
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
GUEST_DIR = Path(os.environ.get("BLKGRAPH_GUEST_DIR", "/var/cache/blkgraph-guest"))
CACHE_DIR = Path(os.environ.get("BLKGRAPH_GUEST_CACHE", GUEST_DIR / "build"))
MODULES = ("virtio_blk", "qemu_fw_cfg")
BUSYBOX = Path("/bin/busybox")
FIO = Path("/usr/bin/fio")
MODPROBE = shutil.which("modprobe") or "/usr/sbin/modprobe"

# Decompressors by magic; the kernel appends the uncompressed size (4 bytes)
# to zstd and xz payloads.
DECOMPRESSORS = (
    (b"\x28\xb5\x2f\xfd", ["zstd", "-dc"], 4),
    (b"\xfd7zXZ\x00", ["xz", "-dc"], 4),
    (b"\x1f\x8b", ["gzip", "-dc"], 0),
)


@dataclass
class GuestImages:
    """Paths of a built guest, ready for qemu -kernel/-initrd."""

    kernel: Path
    initramfs: Path
    kernel_version: str
    io_uring: bool


def kernel_version() -> str:
    """Return the version of the newest unpacked guest kernel."""
    versions = [p.name[len("vmlinuz-") :] for p in (GUEST_DIR / "boot").glob("vmlinuz-*")]
    if not versions:
        raise FileNotFoundError(f"no {GUEST_DIR}/boot/vmlinuz-*: run .ci/install-deps")

    def key(v):
        return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", v)]

    return max(versions, key=key)


def module_files(kver: str) -> list[Path]:
    """Return the module files to load, dependencies first."""
    out = subprocess.run(
        [MODPROBE, "-a", "-d", str(GUEST_DIR), "-S", kver, "--show-depends", *MODULES],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    files = []
    for line in out.splitlines():
        words = line.split()
        if words and words[0] == "insmod":
            path = Path(os.path.normpath(words[1]))
            if path not in files:
                files.append(path)
    return files


def library_closure(binary: Path) -> list[Path]:
    """Return the shared libraries (and the loader) that ldd lists for binary."""
    out = subprocess.run(["ldd", str(binary)], check=True, capture_output=True, text=True).stdout
    libs = []
    for line in out.splitlines():
        m = re.match(r"\s*(?:\S+ => )?(/\S+) \(0x", line)
        if m:
            libs.append(Path(m.group(1)))
    return libs


def decompress(data: bytes, kernel_trailer: bool = False) -> bytes:
    """Decompress data according to its magic; return it as is if it is not compressed.

    kernel_trailer: data is a bzImage payload, which may end with the
    uncompressed size appended by the kernel build.
    """
    for magic, cmd, trailer in DECOMPRESSORS:
        if data.startswith(magic):
            if kernel_trailer and trailer:
                data = data[:-trailer]
            return subprocess.run(cmd, input=data, check=True, capture_output=True).stdout
    return data


def extract_vmlinux(bzimage: bytes) -> bytes:
    """Return the ELF vmlinux compressed inside an x86 bzImage."""
    if bzimage[0x202:0x206] != b"HdrS":
        raise ValueError("not a bzImage")
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    elf = decompress(bzimage[start : start + length], kernel_trailer=True)
    if not elf.startswith(b"\x7fELF"):
        raise ValueError(f"cannot extract an ELF file from the bzImage ({elf[:6].hex()})")
    return elf


class CpioWriter:
    """Minimal writer of the "newc" cpio format that the kernel unpacks."""

    def __init__(self, out):
        self.out = out
        self.ino = 0
        self.dirs = {""}

    def _header(self, path: str, mode: int, size: int = 0, rdev=(0, 0)):
        name = path.strip("/")
        self.add_dir(os.path.dirname(name))
        self.ino += 1
        fields = (self.ino, mode, 0, 0, 1, 0, size, 0, 0, *rdev, len(name) + 1, 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
        self.out.write(header + b"\0" * (-len(header) % 4))

    def _pad(self, size: int):
        self.out.write(b"\0" * (-size % 4))

    def add_dir(self, path: str):
        """Add a directory and its missing parents."""
        path = path.strip("/")
        if path not in self.dirs:
            self.dirs.add(path)
            self._header(path, 0o040755)

    def add_file(self, path: str, src: Path, mode: int = 0o755):
        """Add the content of src as path."""
        size = src.stat().st_size
        self._header(path, 0o100000 | mode, size)
        with open(src, "rb") as f:
            shutil.copyfileobj(f, self.out)
        self._pad(size)

    def add_data(self, path: str, data: bytes, mode: int = 0o644):
        """Add a file with the given content."""
        self._header(path, 0o100000 | mode, len(data))
        self.out.write(data)
        self._pad(len(data))

    def add_chardev(self, path: str, major: int, minor: int):
        """Add a character device node."""
        self._header(path, 0o020600, rdev=(major, minor))

    def finish(self):
        """Write the trailer."""
        self._header("TRAILER!!!", 0)


def _fingerprint(own_files, system_files) -> str:
    """Hash the content of our own files and the identity of the system's."""
    h = hashlib.sha256()
    for p in own_files:
        h.update(p.read_bytes())
    for p in system_files:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _write_initramfs(dest: Path, modules, libs):
    with open(dest, "wb") as out:
        cpio = CpioWriter(out)
        for d in ("dev", "proc", "sys", "tmp"):
            cpio.add_dir(d)
        cpio.add_chardev("/dev/console", 5, 1)
        cpio.add_file("/init", HERE / "init.sh")
        cpio.add_file("/bin/busybox", BUSYBOX)
        cpio.add_file("/usr/bin/fio", FIO)
        for lib in libs:
            cpio.add_file(str(lib), lib)
        names = []
        for mod in modules:
            name = mod.name.split(".ko")[0] + ".ko"
            cpio.add_data(f"/lib/modules/{name}", decompress(mod.read_bytes()))
            names.append(name)
        cpio.add_data("/lib/modules/load.order", "".join(n + "\n" for n in names).encode())
        cpio.finish()


def _io_uring(kver: str) -> bool:
    config = GUEST_DIR / "boot" / f"config-{kver}"
    return config.exists() and "\nCONFIG_IO_URING=y\n" in config.read_text()


def ensure_built(verbose: bool = False) -> GuestImages:
    """Return the guest images, (re)building them if any input changed."""
    kver = kernel_version()
    vmlinuz = GUEST_DIR / "boot" / f"vmlinuz-{kver}"
    modules = module_files(kver)
    libs = library_closure(FIO)
    stamp_value = _fingerprint(
        [Path(__file__), HERE / "init.sh"], [vmlinuz, BUSYBOX, FIO, *modules, *libs]
    )

    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    images = GuestImages(
        CACHE_DIR / f"vmlinux-{kver}", CACHE_DIR / "initramfs.cpio", kver, _io_uring(kver)
    )
    stamp = CACHE_DIR / "stamp"
    with open(CACHE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (
            stamp.exists()
            and stamp.read_text() == stamp_value
            and images.kernel.exists()
            and images.initramfs.exists()
        ):
            return images
        if verbose:
            print(f"building guest images in {CACHE_DIR}", file=sys.stderr)
        stamp.unlink(missing_ok=True)
        tmp = CACHE_DIR / "vmlinux.tmp"
        tmp.write_bytes(extract_vmlinux(vmlinuz.read_bytes()))
        tmp.rename(images.kernel)
        tmp = CACHE_DIR / "initramfs.tmp"
        _write_initramfs(tmp, modules, libs)
        tmp.rename(images.initramfs)
        for old in CACHE_DIR.glob("vmlinux-*"):
            if old != images.kernel:
                old.unlink()
        stamp.write_text(stamp_value)
    return images


if __name__ == "__main__":
    built = ensure_built(verbose=True)
    print(built.kernel)
    print(built.initramfs)
