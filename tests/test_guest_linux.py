"""The PID 1 syscall layer against the real kernel (root, private mount namespaces)."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from eemini.guest import linux
from eemini.guest.dev import devmode

HEADERS = Path("/usr/include/linux")


def _header_value(header: str, name: str) -> int:
    text = (HEADERS / header).read_text()
    m = re.search(rf"^#define\s+{name}\s+(\S+)", text, re.M)
    assert m, f"{name} not in {header}"
    return int(eval(m.group(1).replace("(", "").replace(")", ""), {}))


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("mount.h", "MS_RDONLY"),
        ("mount.h", "MS_NOSUID"),
        ("mount.h", "MS_NODEV"),
        ("mount.h", "MS_NOEXEC"),
        ("mount.h", "MS_NOSYMFOLLOW"),
        ("reboot.h", "LINUX_REBOOT_CMD_POWER_OFF"),
        ("reboot.h", "LINUX_REBOOT_CMD_CAD_OFF"),
        ("prctl.h", "PR_SET_PDEATHSIG"),
        ("prctl.h", "PR_SET_CHILD_SUBREAPER"),
    ],
)
def test_constants_match_kernel_headers(header: str, name: str) -> None:
    if not (HEADERS / header).exists():
        pytest.skip(f"kernel UAPI headers not installed ({HEADERS / header})")
    # prctl(2) is dev mode's and the launcher's, not PID 1's.
    module = devmode if name.startswith("PR_") else linux
    assert getattr(module, name) == _header_value(header, name)


def in_mount_namespace(script: str, directory: Path) -> list[str]:
    """The lines `script` prints, run with `directory` as its argument in a new mount namespace."""
    proc = subprocess.run(
        ["unshare", "-m", sys.executable, "-c", script, os.fspath(directory)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


_MOUNT_SCRIPT = """
import os, sys
from eemini.guest import linux as k
d = sys.argv[1]
k.mount("none", "/", None, 16384 | 1 << 18)  # MS_REC | MS_PRIVATE
k.mount("tmpfs", d, "tmpfs", k.MS_NOSUID | k.MS_NODEV, "size=1m,mode=0700")
assert os.path.ismount(d)
open(os.path.join(d, "f"), "w").write("x")
k.mount("tmpfs", d, "tmpfs", 32 | k.MS_RDONLY, "size=1m")  # 32: MS_REMOUNT
try:
    open(os.path.join(d, "g"), "w")
except OSError as e:
    print("ro", e.errno)
try:
    k.mount("x", d, "no-such-fs")
except OSError as e:
    print("bad", e.errno, e.strerror, e.filename)
k.umount(d, k.MNT_DETACH)
print("mounted-after", os.path.ismount(d))
try:
    k.umount(d)
except OSError as e:
    print("umount", e.errno, e.strerror)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="mount needs root")
def test_mount_remount_umount_in_private_namespace(tmp_path: Path) -> None:
    assert in_mount_namespace(_MOUNT_SCRIPT, tmp_path) == [
        f"ro {errno.EROFS}",
        f"bad {errno.ENODEV} mount: No such device {tmp_path}",
        "mounted-after False",
        f"umount {errno.EINVAL} umount: Invalid argument",
    ]


_NOSYMFOLLOW_SCRIPT = """
import os, sys
from eemini.guest import linux as k
d = sys.argv[1]
k.mount("none", "/", None, 16384 | 1 << 18)  # MS_REC | MS_PRIVATE
for name, flags in (("follow", 0), ("nosymfollow", k.MS_NOSYMFOLLOW)):
    k.mount("tmpfs", d, "tmpfs", k.MS_NOSUID | k.MS_NODEV | flags, "size=1m,mode=0700")
    open(os.path.join(d, "target"), "w").write("secret")
    os.symlink("target", os.path.join(d, "link"))
    try:
        print(name, open(os.path.join(d, "link")).read(), os.readlink(os.path.join(d, "link")))
    except OSError as e:
        print(name, "errno", e.errno, os.readlink(os.path.join(d, "link")))
    k.umount(d, k.MNT_DETACH)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="mount needs root")
def test_nosymfollow_mount_does_not_follow_symlinks(tmp_path: Path) -> None:
    # What the config disk relies on (Linux 5.10+): paths through a symlink on the mount fail
    # with ELOOP; readlink still works.
    assert in_mount_namespace(_NOSYMFOLLOW_SCRIPT, tmp_path) == [
        "follow secret target",
        f"nosymfollow errno {errno.ELOOP} target",
    ]


_SUBREAPER_SCRIPT = """
import os, time
from eemini.guest.dev import devmode
devmode.prctl(devmode.PR_SET_CHILD_SUBREAPER, 1)
if os.fork() == 0:
    if os.fork() == 0:
        time.sleep(0.2)
        os._exit(3)
    os._exit(0)
os.wait()
pid, status = os.wait()  # the orphaned grandchild, reparented to us
print(os.waitstatus_to_exitcode(status))
"""


def test_dev_mode_subreaper_adopts_orphans() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _SUBREAPER_SCRIPT], capture_output=True, text=True, check=True
    )
    assert proc.stdout == "3\n"


def test_prctl_bad_option_raises() -> None:
    with pytest.raises(OSError) as exc:
        devmode.prctl(0x7FFF_FFFF, 0)
    assert exc.value.errno == errno.EINVAL
    assert exc.value.strerror == "prctl: Invalid argument"
