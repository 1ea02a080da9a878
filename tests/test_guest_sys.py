"""The PID 1 syscall layer against the real kernel (root, private mount namespaces)."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from eemini.guest import sys as ksys

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
        ("mount.h", "MS_REMOUNT"),
        ("mount.h", "MS_BIND"),
        ("mount.h", "MS_REC"),
        ("mount.h", "MS_PRIVATE"),
        ("mount.h", "MS_RELATIME"),
        ("reboot.h", "LINUX_REBOOT_CMD_RESTART"),
        ("reboot.h", "LINUX_REBOOT_CMD_HALT"),
        ("reboot.h", "LINUX_REBOOT_CMD_POWER_OFF"),
        ("reboot.h", "LINUX_REBOOT_CMD_CAD_ON"),
        ("reboot.h", "LINUX_REBOOT_CMD_CAD_OFF"),
        ("prctl.h", "PR_SET_PDEATHSIG"),
        ("prctl.h", "PR_SET_NAME"),
        ("prctl.h", "PR_SET_CHILD_SUBREAPER"),
    ],
)
def test_constants_match_kernel_headers(header: str, name: str) -> None:
    if not (HEADERS / header).exists():
        pytest.skip(f"kernel UAPI headers not installed ({HEADERS / header})")
    assert getattr(ksys, name) == _header_value(header, name)


_MOUNT_SCRIPT = """
import os, sys
from eemini.guest import sys as k
d = sys.argv[1]
k.mount("none", "/", None, k.MS_REC | k.MS_PRIVATE)
k.mount("tmpfs", d, "tmpfs", k.MS_NOSUID | k.MS_NODEV, "size=1m,mode=0700")
assert os.path.ismount(d)
open(os.path.join(d, "f"), "w").write("x")
k.mount("tmpfs", d, "tmpfs", k.MS_REMOUNT | k.MS_RDONLY, "size=1m")
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
    proc = subprocess.run(
        ["unshare", "-m", sys.executable, "-c", _MOUNT_SCRIPT, os.fspath(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"ro {errno.EROFS}",
        f"bad {errno.ENODEV} mount: No such device {tmp_path}",
        "mounted-after False",
        f"umount {errno.EINVAL} umount: Invalid argument",
    ]


def test_prctl_set_name_in_child() -> None:
    script = (
        "from eemini.guest import sys as k; k.set_process_name('eemini-test-nm'); "
        "print(open('/proc/self/comm').read().strip()); k.set_child_subreaper()"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert proc.stdout == "eemini-test-nm\n"


def test_prctl_bad_option_raises() -> None:
    with pytest.raises(OSError) as exc:
        ksys.prctl(0x7FFF_FFFF)
    assert exc.value.errno == errno.EINVAL
    assert exc.value.strerror == "prctl: Invalid argument"
