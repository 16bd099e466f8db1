"""Boot a throw-away Linux guest under QEMU and run a shell script inside it.

The guest is a distribution kernel from ``/boot`` plus a tiny initramfs made of a
static busybox and the kernel modules the caller asks for (virtio drivers, mostly).
Devices, such as vhost-user front-ends connected to an outboard back-end, are
attached with ordinary QEMU arguments::

    result = run_guest(
        "cat /sys/class/misc/hw_random/rng_current",
        qemu_args=[
            "-chardev", f"socket,id=rng0,path={socket_path}",
            "-device", "vhost-user-rng-pci,chardev=rng0",
        ],
    )
    assert result.status == 0
    print(result.output)

How a run works:

* Programs of the host (``host_binaries``, say ``mke2fs`` or ``fio``) can be put
  into the initramfs too, with every shared library they load and the dynamic
  loader, at the paths they have on the host (:func:`host_binary_files` finds
  those files). In the script their names run them rather than busybox applets
  of the same names; programs that busybox applets start (``xargs``,
  ``taskset``, ``timeout``) are busybox's own unless given by full path.
* The base initramfs (busybox, modules, host programs, ``/init``) is built once per
  kernel, module list, program list and builder version, and cached
  (``$OUTBOARD_CACHE``, else ``$XDG_CACHE_HOME/outboard``, else ``~/.cache/outboard``).
* The script travels in a second, small cpio archive appended to the base one; the
  kernel unpacks concatenated archives in order.
* ``/init`` mounts the pseudo file systems, loads the modules in dependency order,
  runs the script with its output on the second serial port (``ttyS1``), framed by
  begin and end markers that carry the exit status, then powers the guest off.
  The first serial port (``ttyS0``) is the kernel console.
* QEMU boots the kernel's ELF image (``vmlinux``, extracted from the bzImage once
  and cached) through its PVH entry point when the kernel has one: without the
  kernel's self-decompression a boot under TCG takes about half as long.
* QEMU runs with ``-no-reboot`` and the kernel with ``panic=-1``, so a guest that
  panics ends QEMU too; a guest that hangs is killed after ``timeout`` seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal

__all__ = [
    "BUILDER_VERSION",
    "DEFAULT_MODULES",
    "BackendProcess",
    "Guest",
    "GuestError",
    "GuestFile",
    "GuestResult",
    "GuestTimeout",
    "GuestUnavailable",
    "build_initramfs",
    "choose_accel",
    "default_cache_dir",
    "find_busybox",
    "find_kernel",
    "find_qemu",
    "host_binary_files",
    "parse_output",
    "pvh_kernel",
    "resolve_modules",
    "run_guest",
]

#: Bump whenever the layout or the ``/init`` of the base initramfs changes, so
#: cached archives built by an older builder are not reused.
BUILDER_VERSION = 2

#: Modules loaded by default: the virtio PCI transport and the drivers for the
#: devices outboard provides back-ends for.
DEFAULT_MODULES: tuple[str, ...] = ("virtio_pci", "virtio_rng", "virtio_blk", "virtio_net")

QEMU_BINARY = "qemu-system-x86_64"
BOOT_DIR = Path("/boot")
MODULES_ROOT = Path("/lib/modules")

BEGIN_MARKER = "=====OUTBOARD-SCRIPT-BEGIN====="
END_MARKER = "=====OUTBOARD-SCRIPT-END====="
_END_RE = re.compile(r"\n" + re.escape(END_MARKER) + r" status=(\d+)\r?\n")
#: the init's console line after the script (see ``_INIT_TEMPLATE``)
_EXITED_RE = re.compile(r"outboard-init: script exited with status (\d+), powering off")

_XEN_ELFNOTE_PHYS32_ENTRY = 18
_PVH_VERSION = 1
_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")
_TAIL_CHARS = 4000


class GuestError(RuntimeError):
    """The guest could not be run, or did not report the end of its script."""


class GuestUnavailable(GuestError):
    """QEMU, a kernel, busybox or a module is missing on this machine."""


class GuestTimeout(GuestError):
    """The guest did not finish within the time allowed and was killed."""


# --------------------------------------------------------------------------- host discovery


def choose_accel() -> str:
    """Return the QEMU accelerator to use: ``"kvm"`` or ``"tcg"``.

    KVM is used only when ``/dev/kvm`` can be opened for reading and writing and the
    loaded KVM module is not ``kvm_pvm``: that paravirtual KVM, found inside some
    sandboxes, cannot boot a stock guest kernel in reasonable time. The environment
    variable ``OUTBOARD_ACCEL`` overrides the choice.
    """
    forced = os.environ.get("OUTBOARD_ACCEL", "").strip()
    if forced:
        return forced
    if _kvm_is_paravirtual():
        return "tcg"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return "tcg"
    os.close(fd)
    return "kvm"


def _kvm_is_paravirtual() -> bool:
    if Path("/sys/module/kvm_pvm").exists():
        return True
    try:
        loaded = Path("/proc/modules").read_text()
    except OSError:
        return False
    return any(line.split(" ", 1)[0] == "kvm_pvm" for line in loaded.splitlines())


def find_qemu() -> Path:
    """Return the path of ``qemu-system-x86_64`` or raise :class:`GuestUnavailable`."""
    found = shutil.which(QEMU_BINARY)
    if found is None:
        raise GuestUnavailable(f"{QEMU_BINARY} not found on PATH")
    return Path(found)


def _version_key(version: str) -> tuple[tuple[int, str], ...]:
    return tuple(
        (int(part), "") if part.isdigit() else (-1, part)
        for part in re.findall(r"\d+|[^\d.\-+~]+", version)
    )


def find_kernel() -> tuple[Path, str]:
    """Return ``(vmlinuz path, kernel version)`` of the newest usable kernel in /boot.

    A kernel is usable when its image is readable and its modules are installed
    (``/lib/modules/<version>/modules.dep`` exists).
    """
    candidates: list[tuple[Path, str]] = []
    for image in BOOT_DIR.glob("vmlinuz-*"):
        version = image.name.removeprefix("vmlinuz-")
        if not os.access(image, os.R_OK):
            continue
        if not (MODULES_ROOT / version / "modules.dep").is_file():
            continue
        candidates.append((image, version))
    if not candidates:
        raise GuestUnavailable(
            f"no readable {BOOT_DIR}/vmlinuz-* with modules in {MODULES_ROOT}/<version>"
        )
    return max(candidates, key=lambda c: _version_key(c[1]))


def find_busybox() -> Path:
    """Return the path of a statically linked busybox or raise :class:`GuestUnavailable`."""
    for candidate in (Path("/bin/busybox"), Path("/usr/bin/busybox")):
        if candidate.is_file() and _is_static_elf(candidate):
            return candidate
    found = shutil.which("busybox")
    if found is not None and _is_static_elf(Path(found)):
        return Path(found)
    raise GuestUnavailable("no statically linked busybox found (Debian: busybox-static)")


def _is_static_elf(path: Path) -> bool:
    """True for an ELF executable without a program interpreter (PT_INTERP)."""
    is_elf, interpreter = _elf_interpreter(path)
    return is_elf and interpreter is None


def _elf_interpreter(path: Path) -> tuple[bool, str | None]:
    """``(is a 64-bit ELF file, its program interpreter or None)``."""
    try:
        with path.open("rb") as f:
            header = f.read(64)
            if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2:
                return False, None
            order: Literal["little", "big"] = "little" if header[5] == 1 else "big"
            phoff = int.from_bytes(header[32:40], order)
            phentsize = int.from_bytes(header[54:56], order)
            phnum = int.from_bytes(header[56:58], order)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
            for i in range(phnum):
                entry = table[i * phentsize : (i + 1) * phentsize]
                if int.from_bytes(entry[0:4], order) != 3:  # PT_INTERP
                    continue
                f.seek(int.from_bytes(entry[8:16], order))
                size = int.from_bytes(entry[32:40], order)
                return True, f.read(size).split(b"\0", 1)[0].decode()
    except (OSError, UnicodeDecodeError):
        return False, None
    return True, None


def default_cache_dir() -> Path:
    """``$OUTBOARD_CACHE``, else ``$XDG_CACHE_HOME/outboard``, else ``~/.cache/outboard``."""
    explicit = os.environ.get("OUTBOARD_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "outboard"


# --------------------------------------------------------------------------- host programs

#: Directories searched for host programs after ``$PATH``: the system
#: administration tools (``mke2fs``, ``blkdiscard``) live there and are often
#: missing from an unprivileged user's ``$PATH``.
_EXTRA_PROGRAM_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def _find_program(name: str | os.PathLike[str]) -> Path:
    text = os.fspath(name)
    if "/" in text:
        path = Path(text)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise GuestUnavailable(f"host program {text} is not an executable file")
        return path.absolute()
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), *_EXTRA_PROGRAM_DIRS])
    found = shutil.which(text, path=search)
    if found is None:
        raise GuestUnavailable(f"host program {text!r} not found (searched {search})")
    return Path(found).absolute()


def _shared_libraries(program: Path) -> list[str]:
    """Absolute paths of the shared objects ``program`` loads, as ``ldd`` names them."""
    ldd = shutil.which("ldd")
    if ldd is None:
        raise GuestUnavailable(f"ldd not found: cannot list the libraries of {program}")
    try:
        result = subprocess.run(
            [ldd, str(program)], capture_output=True, text=True, check=False, timeout=60
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise GuestUnavailable(f"ldd {program} failed: {exc}") from exc
    if result.returncode != 0:
        raise GuestUnavailable(f"ldd {program} failed: {(result.stderr or result.stdout).strip()}")
    paths: list[str] = []
    for line in result.stdout.splitlines():
        name, arrow, target = line.strip().partition("=>")
        where = (target if arrow else name).strip()
        where = re.sub(r"\s*\(0x[0-9a-fA-F]+\)$", "", where).strip()
        if where == "not found":
            raise GuestUnavailable(f"{program} needs {name.strip()}, which is not installed")
        if where.startswith("/"):
            paths.append(where)
    return paths


def host_binary_files(programs: Iterable[str | os.PathLike[str]]) -> dict[str, Path]:
    """Map paths inside a guest (relative to ``/``) to the host files to copy there.

    Each program is a command name, looked up on ``$PATH`` and then in the ``sbin``
    directories, or a path. The result holds every program at the path it has on
    the host and, for a dynamically linked one, its program interpreter and all
    the shared libraries it loads (as ``ldd`` resolves them), each at the path
    the loader looks for it; the host files are the symlinks' targets. The mapping
    can be passed as ``files`` to :meth:`Guest.run` or is built into the base
    initramfs by ``Guest(host_binaries=...)``. Raises :class:`GuestUnavailable`
    if a program or one of its libraries is missing.
    """
    found: dict[str, Path] = {}

    def add(guest_path: str, host_path: Path) -> None:
        found.setdefault(guest_path.lstrip("/"), host_path.resolve())

    for program in programs:
        path = _find_program(program)
        add(str(path), path)
        is_elf, interpreter = _elf_interpreter(path.resolve())
        if not is_elf or interpreter is None:
            continue  # a script or a static executable: nothing to load
        add(interpreter, Path(interpreter))
        for library in _shared_libraries(path):
            add(library, Path(library))
    return found


# --------------------------------------------------------------------------- kernel modules


def _normalise(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    for suffix in _MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def _read_modules_dep(moddir: Path) -> dict[str, tuple[str, list[str]]]:
    """Map normalised module name to (relative path, relative paths of direct deps)."""
    table: dict[str, tuple[str, list[str]]] = {}
    dep_file = moddir / "modules.dep"
    try:
        text = dep_file.read_text()
    except OSError as exc:
        raise GuestUnavailable(f"cannot read {dep_file}: {exc}") from exc
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, _, deps = line.partition(":")
        table[_normalise(path)] = (path.strip(), deps.split())
    return table


def _read_softdeps(moddir: Path) -> dict[str, list[str]]:
    """Map normalised module name to the modules its ``softdep ... pre:`` names."""
    table: dict[str, list[str]] = {}
    try:
        text = (moddir / "modules.softdep").read_text()
    except OSError:
        return table
    for line in text.splitlines():
        words = line.split()
        if len(words) < 3 or words[0] != "softdep":
            continue
        pre: list[str] = []
        section = ""
        for word in words[2:]:
            if word.endswith(":"):
                section = word
            elif section == "pre:":
                pre.append(_normalise(word))
        table.setdefault(_normalise(words[1]), []).extend(pre)
    return table


def _read_builtin(moddir: Path) -> set[str]:
    try:
        text = (moddir / "modules.builtin").read_text()
    except OSError:
        return set()
    return {_normalise(line) for line in text.split()}


def resolve_modules(modules: Iterable[str], kernel_version: str) -> list[str]:
    """Return module paths (relative to ``/lib/modules/<version>``) in load order.

    Dependencies come from the kernel's ``modules.dep`` (plus ``pre:`` soft
    dependencies that exist as modules); every module appears after all of its
    dependencies. Modules built into the kernel are skipped; unknown ones raise
    :class:`GuestUnavailable`.
    """
    moddir = MODULES_ROOT / kernel_version
    table = _read_modules_dep(moddir)
    softdeps = _read_softdeps(moddir)
    builtin = _read_builtin(moddir)
    order: list[str] = []
    done: set[str] = set()
    visiting: set[str] = set()

    def visit(name: str, *, required: bool) -> None:
        if name in done:
            return
        if name not in table:
            if name in builtin or not required:
                return
            raise GuestUnavailable(f"kernel module {name!r} not found in {moddir}/modules.dep")
        if name in visiting:
            return  # cycles only arise through soft dependencies; break them
        visiting.add(name)
        path, deps = table[name]
        for soft in softdeps.get(name, ()):
            visit(soft, required=False)
        for dep in deps:
            visit(_normalise(dep), required=True)
        visiting.discard(name)
        done.add(name)
        order.append(path)

    for module in modules:
        visit(_normalise(module), required=True)
    return order


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    name = path.name
    if name.endswith(".xz"):
        return lzma.decompress(data)
    if name.endswith(".gz"):
        return gzip.decompress(data)
    if name.endswith(".zst"):
        zstd = shutil.which("zstd")
        if zstd is None:
            raise GuestUnavailable(f"{path} is zstd-compressed and no zstd tool is installed")
        return subprocess.run([zstd, "-d", "-c", str(path)], check=True, capture_output=True).stdout
    return data


def _installed_path(relpath: str) -> str:
    for suffix in (".xz", ".gz", ".zst"):
        if relpath.endswith(".ko" + suffix):
            return relpath[: -len(suffix)]
    return relpath


# --------------------------------------------------------------------------- cpio archives


class _CpioWriter:
    """Writer for the ``newc`` cpio format the kernel unpacks as initramfs."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._ino = 1
        self._seen: set[str] = set()

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        name = name.strip("/")
        if name in self._seen:
            return
        self._seen.add(name)
        encoded = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = (
            self._ino,
            mode,
            0,
            0,
            nlink,
            0,
            len(data),
            0,
            0,
            rdev[0],
            rdev[1],
            len(encoded),
            0,
        )
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        self._buf.write(header + encoded)
        self._pad()
        self._buf.write(data)
        self._pad()

    def _pad(self) -> None:
        self._buf.write(b"\0" * (-self._buf.tell() % 4))

    def _parents(self, name: str) -> None:
        parts = name.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            self.directory("/".join(parts[:i]))

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._parents(name)
        self._entry(name, stat.S_IFDIR | mode)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._parents(name)
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._parents(name)
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._parents(name)
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self._buf.getvalue()


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=6, mtime=0)


_INIT_TEMPLATE = r"""#!/bin/sh
# outboard guest init: load modules, run /outboard/script.sh, power off.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root TERM=dumb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/mounts /etc/mtab
hostname guest
ip link set lo up 2>/dev/null

for module in @MODULES@; do
    insmod "/lib/modules/@KVER@/$module" || echo "outboard-init: insmod $module failed"
done

out=/dev/ttyS1
[ -c "$out" ] || out=/dev/console
stty -F "$out" raw -echo 2>/dev/null
status=255
if [ -f /outboard/script.sh ]; then
    cd /root
    {
        echo "@BEGIN@"
        sh /outboard/script.sh </dev/null 2>&1
        status=$?
        kill -9 -1 2>/dev/null
        printf '\n%s status=%d\n' "@END@" "$status"
    } >"$out" 2>&1
    # Wait until the port has sent all of it (stty sets modes with TCSADRAIN):
    # the power-off below would cut off what is still in the UART's buffer.
    stty -F "$out" raw -echo 2>/dev/null
    cd /
else
    echo "outboard-init: no /outboard/script.sh in the initramfs"
fi
echo "outboard-init: script exited with status $status, powering off"
sync
poweroff -f
"""

_WAIT_FOR_PATH = r"""#!/bin/sh
# usage: wait-for-path PATH [SECONDS]: poll until PATH exists, fail after SECONDS (10).
path=$1
limit=$(( ${2:-10} * 20 ))
i=0
while [ ! -e "$path" ]; do
    i=$((i + 1))
    if [ "$i" -gt "$limit" ]; then
        echo "wait-for-path: $path did not appear" >&2
        exit 1
    fi
    sleep 0.05
done
"""


def _busybox_applets(busybox: Path) -> list[str]:
    try:
        listing = subprocess.run(
            [str(busybox), "--list-full"], check=True, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise GuestUnavailable(f"cannot list the applets of {busybox}: {exc}") from exc
    return [line.strip() for line in listing.splitlines() if line.strip()]


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_initramfs(
    modules: Sequence[str] = DEFAULT_MODULES,
    cache_dir: Path | None = None,
    *,
    kernel_version: str | None = None,
    busybox: Path | None = None,
    host_binaries: Sequence[str | os.PathLike[str]] = (),
) -> Path:
    """Build (or reuse from the cache) the base initramfs and return its path.

    The archive is a gzip-compressed newc cpio holding busybox with a symlink per
    applet, ``modules`` and everything they depend on (decompressed), the host
    programs ``host_binaries`` with their libraries (see :func:`host_binary_files`;
    a busybox applet of the same name as one of them is left out), a
    ``wait-for-path`` helper and the ``/init`` described in the module docstring.
    It is cached under ``cache_dir`` (default :func:`default_cache_dir`) by kernel
    version, module list, busybox, host files and :data:`BUILDER_VERSION`.
    """
    if kernel_version is None:
        kernel_version = find_kernel()[1]
    busybox = busybox if busybox is not None else find_busybox()
    cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
    moddir = MODULES_ROOT / kernel_version
    dep_stat = (moddir / "modules.dep").stat()
    extra_files = host_binary_files(host_binaries)
    key_fields: dict[str, object] = {
        "builder": BUILDER_VERSION,
        "kernel": kernel_version,
        "modules_dep": [dep_stat.st_size, dep_stat.st_mtime_ns],
        "modules": list(modules),
        "busybox": _file_digest(busybox),
    }
    if extra_files:
        key_fields["host_files"] = [
            [name, str(source), source.stat().st_size, source.stat().st_mtime_ns]
            for name, source in sorted(extra_files.items())
        ]
    key_material = json.dumps(key_fields, sort_keys=True).encode()
    key = hashlib.sha256(key_material).hexdigest()[:20]
    target = cache_dir / f"initramfs-{kernel_version}-{key}.cpio.gz"
    if target.is_file():
        return target

    load_order = resolve_modules(modules, kernel_version)
    cpio = _CpioWriter()
    for directory in (
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "etc",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "root",
        "mnt",
        "var",
        "outboard",
    ):
        cpio.directory(directory)
    cpio.char_device("dev/console", 5, 1)
    cpio.char_device("dev/null", 1, 3, mode=0o666)
    for name, source in extra_files.items():
        cpio.file(name, source.read_bytes(), mode=stat.S_IMODE(source.stat().st_mode))
    shadowed = {Path(os.fspath(program)).name for program in host_binaries}
    cpio.file("bin/busybox", busybox.read_bytes(), mode=0o755)
    for applet in _busybox_applets(busybox):
        if applet != "bin/busybox" and Path(applet).name not in shadowed:
            depth = applet.count("/")
            cpio.symlink(applet, "../" * depth + "bin/busybox")
    cpio.file("bin/wait-for-path", _WAIT_FOR_PATH.encode(), mode=0o755)
    installed: list[str] = []
    for relpath in load_order:
        dest = _installed_path(relpath)
        cpio.file(f"lib/modules/{kernel_version}/{dest}", _read_module(moddir / relpath))
        installed.append(dest)
    cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    cpio.file("etc/group", b"root:x:0:\n")
    init = (
        _INIT_TEMPLATE.replace("@MODULES@", " ".join(shlex.quote(m) for m in installed))
        .replace("@KVER@", kernel_version)
        .replace("@BEGIN@", BEGIN_MARKER)
        .replace("@END@", END_MARKER)
    )
    cpio.file("init", init.encode(), mode=0o755)
    data = _gzip(cpio.finish())

    _write_atomically(target, data)
    return target


#: What ``files`` may map a guest path to: the contents (text or bytes) or, as a
#: :class:`~pathlib.Path`, a host file to copy (keeping its permission bits).
GuestFile = bytes | str | Path


def _shadowing_prelude(programs: Sequence[str | os.PathLike[str]]) -> str:
    """Shell functions that make host programs win over busybox applets of their name.

    Busybox's shell runs its own applet for a command name before searching
    ``$PATH``, so a host ``mke2fs`` is reached through a function calling it by
    its path. The functions end in ``;`` on the script's first line, so the line
    numbers of the script's messages stay right. Programs started by busybox
    applets (``xargs``, ``taskset``) still need the full path.
    """
    applets = {Path(applet).name for applet in _busybox_applets(find_busybox())}
    functions = []
    for program in programs:
        name = Path(os.fspath(program)).name
        if name in applets and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            path = shlex.quote(str(_find_program(program)))
            functions.append(f'{name}() {{ {path} "$@"; }}; ')
    return "".join(functions)


def _script_archive(script: str, files: Mapping[str, GuestFile]) -> bytes:
    cpio = _CpioWriter()
    cpio.directory("outboard")
    cpio.file("outboard/script.sh", script.encode(), mode=0o755)
    for name, content in files.items():
        if isinstance(content, Path):
            cpio.file(name, content.read_bytes(), mode=stat.S_IMODE(content.stat().st_mode))
            continue
        payload = content.encode() if isinstance(content, str) else content
        executable = payload.startswith((b"#!", b"\x7fELF"))
        cpio.file(name, payload, mode=0o755 if executable else 0o644)
    return _gzip(cpio.finish())


# --------------------------------------------------------------------------- PVH kernel image


def _elf_has_pvh_note(data: bytes) -> bool:
    """True if ``data`` is a 64-bit little-endian ELF with a Xen PVH entry note."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return False
    phoff = int.from_bytes(data[32:40], "little")
    phentsize = int.from_bytes(data[54:56], "little")
    phnum = int.from_bytes(data[56:58], "little")
    for i in range(phnum):
        entry = data[phoff + i * phentsize : phoff + (i + 1) * phentsize]
        if int.from_bytes(entry[0:4], "little") != 4:  # PT_NOTE
            continue
        offset = int.from_bytes(entry[8:16], "little")
        end = offset + int.from_bytes(entry[32:40], "little")
        while offset + 12 <= end:
            namesz = int.from_bytes(data[offset : offset + 4], "little")
            descsz = int.from_bytes(data[offset + 4 : offset + 8], "little")
            kind = int.from_bytes(data[offset + 8 : offset + 12], "little")
            name = data[offset + 12 : offset + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and kind == _XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            offset += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def _decompress_payload(image: bytes) -> bytes | None:
    """Find and decompress the ELF kernel inside a bzImage, or return None."""
    candidates: list[tuple[int, str]] = []
    for magic, kind in ((b"\xfd7zXZ\x00", "xz"), (b"\x1f\x8b\x08", "gzip")):
        start = image.find(magic)
        if start >= 0:
            candidates.append((start, kind))
    for start, kind in sorted(candidates):
        try:
            if kind == "xz":
                data = lzma.LZMADecompressor().decompress(image[start:])
            else:
                data = zlib.decompressobj(wbits=31).decompress(image[start:])
        except (lzma.LZMAError, zlib.error):
            continue
        if data[:4] == b"\x7fELF":
            return data
    return None


def pvh_kernel(image: Path, cache_dir: Path | None = None) -> Path | None:
    """Return an uncompressed ELF kernel QEMU can boot directly, or None.

    QEMU boots an ELF ``vmlinux`` carrying a Xen PVH entry note without running the
    kernel's own decompressor, which under TCG saves seconds on every boot. The
    ELF is extracted from the bzImage ``image`` (xz- or gzip-compressed) once and
    cached; None means the image cannot be booted that way and should be used as is.
    """
    cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
    info = image.stat()
    key_material = f"{_PVH_VERSION}:{image.name}:{info.st_size}:{info.st_mtime_ns}"
    key = hashlib.sha256(key_material.encode()).hexdigest()[:20]
    prefix = f"vmlinux-{image.name.removeprefix('vmlinuz-')}-"
    target = cache_dir / f"{prefix}{key}"
    if target.is_file():
        return target
    marker = target.with_name(target.name + ".unusable")
    if marker.is_file():
        return None
    data = _decompress_payload(image.read_bytes())
    if data is None or not _elf_has_pvh_note(data):
        cache_dir.mkdir(parents=True, exist_ok=True)
        marker.touch()
        return None
    _write_atomically(target, data)
    for stale in cache_dir.glob(f"{prefix}*"):
        if stale.name != target.name and not stale.name.startswith("."):
            with contextlib.suppress(OSError):
                stale.unlink()
    return target


def _write_atomically(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)
            f.write(data)
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise


# --------------------------------------------------------------------------- running


@dataclasses.dataclass(frozen=True)
class GuestResult:
    """What a guest run produced."""

    #: Exit status of the script inside the guest.
    status: int
    #: The script's standard output and standard error, without the markers.
    output: str
    #: Everything on the guest's serial console (kernel messages and ``/init``).
    console: str
    #: Everything written to the script's serial port, markers included.
    raw_output: str
    #: QEMU's own standard output and standard error.
    qemu_log: str
    #: Wall-clock seconds from starting QEMU to its exit.
    duration: float

    def check(self) -> GuestResult:
        """Return ``self`` if the script exited 0, else raise :class:`GuestError`."""
        if self.status != 0:
            raise GuestError(
                f"guest script exited with status {self.status}\n"
                f"--- script output ---\n{_tail(self.output)}\n"
                f"--- console ---\n{_tail(self.console)}"
            )
        return self


def _tail(text: str, limit: int = _TAIL_CHARS) -> str:
    text = text.rstrip()
    return text if len(text) <= limit else "[...]\n" + text[-limit:]


def _escape_option(value: str) -> str:
    return value.replace(",", ",,")


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return ""


def parse_output(raw: str, console: str = "") -> tuple[int, str] | None:
    """Return ``(status, output)`` from the script port's text, or None if unfinished.

    The script port's last bytes can be lost when the guest powers off (seen
    after the VM was paused and resumed, though the init drains the port
    first); then the init's line on the ``console``, written after them,
    gives the status, and the output is what arrived.
    """
    raw = raw.replace("\r\n", "\n")
    begin = raw.find(BEGIN_MARKER + "\n")
    if begin < 0:
        return None
    body_start = begin + len(BEGIN_MARKER) + 1
    ends = list(_END_RE.finditer(raw, body_start - 1))
    if ends:
        end = ends[-1]
        return int(end.group(1)), raw[body_start : end.start()]
    exited = _EXITED_RE.findall(console)
    if not exited:
        return None
    return int(exited[-1]), raw[body_start:]


class Guest:
    """A guest configuration: kernel, base initramfs and QEMU settings.

    ``modules`` are the kernel modules to load (dependencies are added);
    ``cache_dir`` overrides :func:`default_cache_dir`; ``accel`` overrides
    :func:`choose_accel`; ``qemu`` and ``kernel`` (image, version) override
    :func:`find_qemu` and :func:`find_kernel`; ``pvh=False`` boots the compressed
    kernel image instead of the extracted ELF (see :func:`pvh_kernel`);
    ``host_binaries`` are host programs to run in the guest (see
    :func:`build_initramfs`), for example ``["mke2fs", "e2fsck"]``.

    The base initramfs is built (or taken from the cache) when the object is
    created; :meth:`run` can then be called any number of times, from any thread.
    Raises :class:`GuestUnavailable` when a part is missing.
    """

    def __init__(
        self,
        *,
        modules: Sequence[str] = DEFAULT_MODULES,
        cache_dir: Path | None = None,
        accel: str | None = None,
        qemu: Path | None = None,
        kernel: tuple[Path, str] | None = None,
        pvh: bool = True,
        host_binaries: Sequence[str | os.PathLike[str]] = (),
    ) -> None:
        self.qemu = qemu if qemu is not None else find_qemu()
        self.kernel, self.kernel_version = kernel if kernel is not None else find_kernel()
        self.accel = accel if accel is not None else choose_accel()
        self.initramfs = build_initramfs(
            modules,
            cache_dir,
            kernel_version=self.kernel_version,
            host_binaries=host_binaries,
        )
        #: The image QEMU boots: an uncompressed PVH ``vmlinux`` when one can be made.
        self.boot_image = (pvh_kernel(self.kernel, cache_dir) if pvh else None) or self.kernel
        self._prelude = _shadowing_prelude(host_binaries) if host_binaries else ""

    def command(
        self,
        *,
        initrd: Path,
        console_log: Path,
        output_log: Path,
        qemu_args: Sequence[str] = (),
        memory_mib: int = 512,
        cpus: int = 1,
        append: Sequence[str] = (),
    ) -> list[str]:
        """The QEMU command line for one run (see :meth:`run` for the parameters)."""
        cmdline = [
            "console=ttyS0",
            "panic=-1",
            "quiet",
            "loglevel=4",
            "rdinit=/init",
            "i8042.noaux",
            "i8042.nokbd",
            "i8042.nopnp",
            *append,
        ]
        cpu = "host" if self.accel == "kvm" else "max"
        return [
            str(self.qemu),
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-display",
            "none",
            "-machine",
            "q35",
            "-accel",
            self.accel,
            "-cpu",
            cpu,
            "-smp",
            str(cpus),
            "-m",
            f"{memory_mib}M",
            "-object",
            f"memory-backend-memfd,id=mem,size={memory_mib}M,share=on",
            "-numa",
            "node,memdev=mem",
            "-chardev",
            f"file,id=console,path={_escape_option(str(console_log))}",
            "-serial",
            "chardev:console",
            "-chardev",
            f"file,id=output,path={_escape_option(str(output_log))}",
            "-serial",
            "chardev:output",
            "-kernel",
            str(self.boot_image),
            "-initrd",
            str(initrd),
            "-append",
            " ".join(cmdline),
            *qemu_args,
        ]

    def run(
        self,
        script: str,
        *,
        qemu_args: Sequence[str] = (),
        memory_mib: int = 512,
        cpus: int = 1,
        timeout: float = 120,
        files: Mapping[str, GuestFile] | None = None,
        append: Sequence[str] = (),
    ) -> GuestResult:
        """Boot the guest, run ``script`` with ``/bin/sh`` in it, and return the result.

        The script runs as root in ``/root`` with busybox's applets (and the host
        programs given as ``host_binaries``), the modules
        already loaded, ``/proc``, ``/sys``, ``/dev`` (devtmpfs) and a tmpfs ``/tmp``
        mounted, standard input from ``/dev/null`` and standard error merged into
        standard output. ``wait-for-path PATH [SECONDS]`` polls until a path (say a
        device node) exists. Processes the script leaves behind are killed when it
        ends.

        ``qemu_args`` are appended to the QEMU command line (devices, chardevs);
        ``files`` maps paths inside the guest (relative to ``/``) to contents or
        host files (:data:`GuestFile`; see also :func:`host_binary_files`);
        ``append`` adds kernel command-line parameters. The guest is killed after
        ``timeout`` seconds and :class:`GuestTimeout` raised; a guest that stops
        without reporting the script's end raises :class:`GuestError`. A non-zero
        exit status of the script is not an error here: see :meth:`GuestResult.check`.
        """
        with tempfile.TemporaryDirectory(prefix="outboard-guest-") as tmp:
            workdir = Path(tmp)
            initrd = workdir / "initrd.img"
            with initrd.open("wb") as f:
                with self.initramfs.open("rb") as base:
                    shutil.copyfileobj(base, f)
                f.write(b"\0" * (-f.tell() % 4))
                f.write(_script_archive(self._prelude + script, files or {}))
            console_log = workdir / "console.log"
            output_log = workdir / "output.log"
            argv = self.command(
                initrd=initrd,
                console_log=console_log,
                output_log=output_log,
                qemu_args=qemu_args,
                memory_mib=memory_mib,
                cpus=cpus,
                append=append,
            )
            started = time.monotonic()
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            timed_out = False
            try:
                qemu_out, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                proc.kill()
                qemu_out, _ = proc.communicate()
            except BaseException:
                proc.kill()
                proc.communicate()
                raise
            duration = time.monotonic() - started
            qemu_log = qemu_out.decode("utf-8", errors="replace")
            console = _read_text(console_log)
            raw_output = _read_text(output_log)

        def details() -> str:
            return (
                f"--- QEMU (exit {proc.returncode}) ---\n{_tail(qemu_log)}\n"
                f"--- console ---\n{_tail(console)}\n"
                f"--- script output ---\n{_tail(raw_output)}\n"
                f"--- command ---\n{shlex.join(argv)}"
            )

        if timed_out:
            raise GuestTimeout(f"guest did not finish within {timeout:g} s\n{details()}")
        parsed = parse_output(raw_output, console)
        if parsed is None:
            raise GuestError(f"guest stopped without reporting the end of its script\n{details()}")
        status, output = parsed
        return GuestResult(
            status=status,
            output=output,
            console=console,
            raw_output=raw_output,
            qemu_log=qemu_log,
            duration=duration,
        )


def run_guest(
    script: str,
    *,
    qemu_args: Sequence[str] = (),
    memory_mib: int = 512,
    cpus: int = 1,
    timeout: float = 120,
    files: Mapping[str, GuestFile] | None = None,
    append: Sequence[str] = (),
    modules: Sequence[str] = DEFAULT_MODULES,
    cache_dir: Path | None = None,
    host_binaries: Sequence[str | os.PathLike[str]] = (),
) -> GuestResult:
    """Boot a guest with :data:`DEFAULT_MODULES` (or ``modules``) and run ``script``.

    A shorthand for ``Guest(modules=..., cache_dir=..., host_binaries=...).run(...)``.
    """
    guest = Guest(modules=modules, cache_dir=cache_dir, host_binaries=host_binaries)
    return guest.run(
        script,
        qemu_args=qemu_args,
        memory_mib=memory_mib,
        cpus=cpus,
        timeout=timeout,
        files=files,
        append=append,
    )


# --------------------------------------------------------------------------- back-ends


class BackendProcess:
    """An outboard back-end run as a user would: ``python -m outboard <args>``.

    Used as a context manager: entering starts the process and waits until it
    writes a line containing ``ready_text`` (default ``"outboard: listening on"``)
    to standard error; leaving stops it with SIGTERM (then SIGKILL) if it still
    runs. Standard error is collected throughout in :attr:`stderr`.
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        ready_text: str = "outboard: listening on",
        ready_timeout: float = 10.0,
        python: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.argv = [python or sys.executable, "-m", "outboard", *args]
        self.ready_text = ready_text
        self.ready_timeout = ready_timeout
        self.env = dict(env) if env is not None else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._chunks: list[bytes] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._eof = False
        self._reader: threading.Thread | None = None

    @property
    def process(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise RuntimeError("back-end not started")
        return self._proc

    @property
    def stderr(self) -> str:
        with self._lock:
            return b"".join(self._chunks).decode("utf-8", errors="replace")

    def start(self) -> BackendProcess:
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        self._reader = threading.Thread(target=self._drain, name="backend-stderr", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + self.ready_timeout
        with self._changed:
            while True:
                text = b"".join(self._chunks).decode("utf-8", errors="replace")
                if self.ready_text in text:
                    return self
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    break
                self._changed.wait(remaining)
        returncode = self._proc.poll()
        self.stop()
        state = "exited with " + str(returncode) if returncode is not None else "still running"
        raise GuestError(
            f"back-end did not report {self.ready_text!r} within {self.ready_timeout:g} s "
            f"({state})\ncommand: {shlex.join(self.argv)}\nstderr:\n{_tail(self.stderr)}"
        )

    def _drain(self) -> None:
        stream = self.process.stderr
        assert stream is not None
        fd = stream.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            with self._changed:
                if not chunk:
                    self._eof = True
                    self._changed.notify_all()
                    return
                self._chunks.append(chunk)
                self._changed.notify_all()

    def terminate(self, timeout: float = 10.0) -> int:
        """Send SIGTERM and wait up to ``timeout`` s; return the exit code.

        Raises :class:`GuestError` (after killing it) if the process does not exit.
        """
        proc = self.process
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            self._finish()
            raise GuestError(
                f"back-end did not exit within {timeout:g} s of SIGTERM\n"
                f"stderr:\n{_tail(self.stderr)}"
            ) from None
        self._finish()
        return code

    def stop(self) -> None:
        """Terminate the process if it still runs, killing it if SIGTERM is not enough."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            with contextlib.suppress(GuestError):
                self.terminate()
        else:
            self._finish()

    def _finish(self) -> None:
        if self._reader is not None:
            self._reader.join(5)
        proc = self.process
        if proc.stderr is not None and not proc.stderr.closed:
            proc.stderr.close()

    def __enter__(self) -> BackendProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
