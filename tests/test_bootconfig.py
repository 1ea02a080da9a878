"""Boot-time config: cmdline parsing, agent.env, key policy, config disks, metadata servers."""

from __future__ import annotations

import ipaddress
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from eemini.guest import bootconfig as bc
from eemini.guest import configdisk as cd
from eemini.guest import imds
from eemini.guest import metadata as md
from eemini.guest.dev import cmdline as cl
from eemini.guest.image import ConfigSource as S
from fake_metadata import Behaviour, Server


def test_cmdline_like_the_kernel() -> None:
    c = cl.parse_cmdline(
        'console=ttyS0,115200 quiet ee.dev=1 ee.UPSTREAM_URL="http://a b" "ee.X=1 2" ro ee.EMPTY= '
        "-- init-arg ee.NOPE=1\n"
    )
    assert c.params == (
        ("console", "ttyS0,115200"),
        ("quiet", None),
        ("ee.dev", "1"),
        ("ee.UPSTREAM_URL", "http://a b"),
        ("ee.X", "1 2"),
        ("ro", None),
        ("ee.EMPTY", ""),
    )
    assert c.has("ee.dev", "1") and not c.has("console", "tty0") and not c.has("quiet", "")
    assert [(s.key, s.value) for s in cl.cmdline_settings(c)] == [
        ("UPSTREAM_URL", "http://a b"),
        ("X", "1 2"),
        ("EMPTY", ""),
    ]


def test_cmdline_errors() -> None:
    with pytest.raises(bc.ConfigError, match="the kernel command line has an unterminated double quote"):
        cl.parse_cmdline('a="b c')
    with pytest.raises(
        bc.ConfigError,
        match=r"boot config 'ee.FLAG' from cmdline has no value \(expected ee.KEY=VALUE\)",
    ):
        cl.cmdline_settings(cl.parse_cmdline("ee.FLAG"))
    with pytest.raises(
        bc.ConfigError, match=r"boot config key '1BAD' from cmdline \(ee.1BAD\) is not a valid name"
    ):
        cl.cmdline_settings(cl.parse_cmdline("ee.1BAD=x"))


# lib/ctype.c: isspace() is true for \t \n \v \f \r, the space and the byte 0xA0, nothing else.
@pytest.mark.parametrize("space", [b"\t", b"\n", b"\v", b"\f", b"\r", b" ", b"\xa0"])
def test_cmdline_splits_on_the_kernels_spaces(space: bytes) -> None:
    raw = b"ee.A=1" + space + b"ee.B=2" + space
    # PID 1 passes the text it read with surrogateescape; bytes are taken as they are.
    for given in (raw.decode("utf-8", "surrogateescape"), raw):
        assert cl.parse_cmdline(given).params == (("ee.A", "1"), ("ee.B", "2"))


@pytest.mark.parametrize(
    "other",
    [b"\x1c", b"\x1d", b"\x1e", b"\x1f", b"\x85", "\u0085".encode(), "\u2028".encode(),
     "\u2029".encode(), "\u3000".encode(), b"\x1b"],
)  # fmt: skip
def test_cmdline_keeps_what_the_kernel_does_not_split_on(other: bytes) -> None:
    raw = b"ee.A=1" + other + b"ee.B=2"
    value = (b"1" + other + b"ee.B=2").decode("utf-8", "surrogateescape")
    for given in (raw.decode("utf-8", "surrogateescape"), raw):
        assert cl.parse_cmdline(given).params == (("ee.A", value),)


def test_cmdline_utf8_no_break_space_is_split_at_its_second_byte() -> None:
    # U+00A0 is C2 A0 in UTF-8: the kernel splits at A0 and leaves C2 on the first value, which
    # is then not UTF-8 and refused; str.split() would have given A=1 and B=2.
    c = cl.parse_cmdline("ee.A=1\u00a0ee.B=2".encode())
    assert c.params == (("ee.A", "1\udcc2"), ("ee.B", "2"))
    with pytest.raises(
        bc.ConfigError,
        match=r"^boot config key 'A' from cmdline \(ee.A\) has a value that is not UTF-8$",
    ):
        cl.cmdline_settings(c)
    # The same from the text PID 1 reads (surrogateescape keeps the bytes).
    text = "ee.A=1\u00a0ee.B=2".encode().decode("utf-8", "surrogateescape")
    assert cl.parse_cmdline(text) == c


@pytest.mark.parametrize(
    ("cmdline", "params"),
    [
        # Only the quotes around a whole argument or around a value are dropped.
        ('ee.A=x"y z"', (("ee.A", 'x"y z"'),)),
        ('ee.A="x"y', (("ee.A", 'x"y'),)),
        ('"ee.A=x y" b', (("ee.A", "x y"), ("b", None))),
        ('a"b c"d', (('a"b c"d', None),)),
        ("ee.A=b=c", (("ee.A", "b=c"),)),
        ("=x=y", (("=x", "y"),)),  # a leading = does not count (next_arg's equals == 0)
        ("--=1 ee.A=1 -- ee.B=2", (("--", "1"), ("ee.A", "1"))),
        ('a "--" ee.B=2', (("a", None),)),
        ("a\0ee.B=2", (("a", None),)),  # the kernel's copy ends at a NUL
    ],
)
def test_cmdline_quotes_and_equals_like_next_arg(cmdline: str, params: tuple[object, ...]) -> None:
    assert cl.parse_cmdline(cmdline).params == params
    assert cl.parse_cmdline(cmdline.encode()).params == params


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        # Only \n ends a line (a \r before it goes too); only space and tab are trimmed.
        (b"A=1\x1cB=2\n", [("A", "1\x1cB=2")]),
        (b"A=1\x1dB=2\x1e\x1f\n", [("A", "1\x1dB=2\x1e\x1f")]),
        (b"A=1\vB=2\fC=3\n", [("A", "1\vB=2\fC=3")]),
        (b"A=1\rB=2\r\n", [("A", "1\rB=2")]),
        ("A=1\u0085B=2\n".encode(), [("A", "1\u0085B=2")]),
        ("A=1\u2028B=2\u2029\n".encode(), [("A", "1\u2028B=2\u2029")]),
        ("A=\u00a0x\u00a0\n".encode(), [("A", "\u00a0x\u00a0")]),
        ("A=\u3000x\u3000".encode(), [("A", "\u3000x\u3000")]),
        (b" \tA \t= \t1 \t\r\n\t# comment\n \t\n", [("A", "1")]),
        (b'A=" 1 "\n', [("A", " 1 ")]),
    ],
)
def test_agent_env_whitespace_is_space_and_tab(data: bytes, expected: list[tuple[str, str]]) -> None:
    assert [(s.key, s.value) for s in bc.parse_env(data, S.CONFIG_DISK)] == expected


def test_agent_env_unicode_space_in_a_key_is_refused() -> None:
    with pytest.raises(
        bc.ConfigError,
        match=r"^boot config key '\\xa0A' from config-disk \(line 1\) is not a valid name$",
    ):
        bc.parse_env("\u00a0A=1\n".encode(), S.CONFIG_DISK)
    with pytest.raises(
        bc.ConfigError,
        match=r"^boot config key 'A\\x1c' from config-disk \(line 1\) is not a valid name$",
    ):
        bc.parse_env(b"A\x1c=1\n", S.CONFIG_DISK)


def test_agent_env_parsing() -> None:
    data = b"# comment\n\nUPSTREAM_URL = 'http://x:1/=y'\nLOG_LEVEL=\"debug\"\nEE_IP=10.0.0.5/24\nEMPTY=\r\n"
    got = bc.parse_env(data, S.CONFIG_DISK)
    assert [(s.source, s.key, s.value) for s in got] == [
        (S.CONFIG_DISK, "UPSTREAM_URL", "http://x:1/=y"),
        (S.CONFIG_DISK, "LOG_LEVEL", "debug"),
        (S.CONFIG_DISK, "EE_IP", "10.0.0.5/24"),
        (S.CONFIG_DISK, "EMPTY", ""),
    ]
    # What the runtime event log records: never the value itself, only its digest.
    assert got[1].digest == (
        # SHA-384 of "debug", computed with coreutils: printf debug | sha384sum
        "sha384:b345909bba936cdc8ea81ae3ffe6c668481d351df7c46efd502f7f7f94dff566"
        "d40a9ecaa6621609419ad1903f74a799"
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"JUST_A_WORD\n", r"agent.env from config-disk line 1 is not KEY=VALUE: 'JUST_A_WORD'"),
        (b"A=1\n=2\n", r"agent.env from config-disk line 2 is not KEY=VALUE: '=2'"),
        (b"A=1\nA=2\n", r"boot config key 'A' from config-disk is set twice \(line 2\)"),
        (b"BAD-KEY=1\n", r"boot config key 'BAD-KEY' from config-disk \(line 1\) is not a valid name"),
        (b"A=\xff\n", r"agent.env from config-disk is not UTF-8 \(byte 2\)"),
        (
            b"A=" + b"x" * 5000,
            r"boot config key 'A' from config-disk \(line 1\) has a value that is too long",
        ),
        (b"A=1\n" * 20000, r"agent.env from config-disk is 80000 bytes, more than 65536"),
    ],
)
def test_agent_env_malformed(data: bytes, message: str) -> None:
    with pytest.raises(bc.ConfigError, match=message):
        bc.parse_env(data, S.CONFIG_DISK)


def test_policy_accepts_allowed_and_network_keys() -> None:
    settings = [
        bc.Setting(S.CMDLINE, "UPSTREAM_URL", "a"),
        bc.Setting(S.CONFIG_DISK, "UPSTREAM_URL", "b"),
        bc.Setting(S.CONFIG_DISK, "EE_IP", "192.168.1.9/24"),
        bc.Setting(S.CMDLINE, "EE_GATEWAY", "192.168.1.1"),
        bc.Setting(S.CONFIG_DISK, "EE_DNS", "1.1.1.1, 9.9.9.9"),
    ]
    cfg = bc.apply_policy(settings, ["UPSTREAM_URL", "OTHER"])
    assert cfg.env == {"UPSTREAM_URL": "b"}
    assert cfg.network == bc.NetworkConfig(
        ipaddress.IPv4Interface("192.168.1.9/24"),
        ipaddress.IPv4Address("192.168.1.1"),
        (ipaddress.IPv4Address("1.1.1.1"), ipaddress.IPv4Address("9.9.9.9")),
    )
    assert cfg.settings == tuple(settings)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            bc.Setting(S.CONFIG_DISK, "PATH", "/evil"),
            r"boot config key 'PATH' from config-disk is not allowed "
            r"\(allowed: EE_DNS, EE_GATEWAY, EE_IP, UPSTREAM_URL\)",
        ),
        (
            bc.Setting(S.GCE_METADATA, "EE_IP", "10.0.0.1/24"),
            r"boot config key 'EE_IP' from gce-metadata is not allowed: network keys are read before",
        ),
        (
            bc.Setting(S.CMDLINE, "EE_IP", "10.0.0.1"),
            r"'EE_IP' from cmdline is not valid: needs a prefix length",
        ),
        (bc.Setting(S.CMDLINE, "EE_GATEWAY", "10.0.0.300"), r"'EE_GATEWAY' from cmdline is not valid: "),
        (bc.Setting(S.CONFIG_DISK, "EE_DNS", "1.1.1.1,x"), r"'EE_DNS' from config-disk is not valid: "),
        (
            bc.Setting(S.CONFIG_DISK, "EE_GATEWAY", "10.0.0.1"),
            r"boot config sets EE_GATEWAY/EE_DNS without EE_IP",
        ),
    ],
)
def test_policy_refuses(setting: bc.Setting, message: str) -> None:
    with pytest.raises(bc.ConfigError, match=message):
        bc.apply_policy([setting], ["UPSTREAM_URL"])


# --- config disks: real filesystem images made by the host tools eemini run uses ---


def _vfat(tmp: Path, label: str, content: bytes | None) -> Path:
    img = tmp / f"{label}.img"
    subprocess.run(
        ["/usr/sbin/mkfs.vfat", "-C", "-n", label, os.fspath(img), "1024"],
        check=True,
        capture_output=True,
    )
    if content is not None:
        src = tmp / "agent.env"
        src.write_bytes(content)
        subprocess.run(["mcopy", "-i", os.fspath(img), os.fspath(src), "::agent.env"], check=True)
    return img


def test_detect_vfat_label(tmp_path: Path) -> None:
    img = _vfat(tmp_path, "EECONFIG", None)
    assert cd.detect_label(os.fspath(img)) == ("vfat", "EECONFIG")


def test_detect_fat32_label(tmp_path: Path) -> None:
    img = tmp_path / "f32.img"
    subprocess.run(
        ["/usr/sbin/mkfs.vfat", "-F", "32", "-C", "-n", "EECONFIG", os.fspath(img), "40000"],
        check=True,
        capture_output=True,
    )
    assert cd.detect_label(os.fspath(img)) == ("vfat", "EECONFIG")


def test_detect_iso9660_label(tmp_path: Path) -> None:
    from eemini.run import make_iso9660

    img = tmp_path / "c.iso"
    make_iso9660(img, {"agent.env": b"A=1\n"}, label="EECONFIG")
    assert cd.detect_label(os.fspath(img)) == ("iso9660", "EECONFIG")
    assert cd.detect_label("/nonexistent") is None
    other = tmp_path / "zero"
    other.write_bytes(bytes(40000))
    assert cd.detect_label(os.fspath(other)) is None


def _pci(root: Path, name: str, vendor: str, device: str) -> None:
    d = root / name
    d.mkdir(parents=True)
    (d / "vendor").write_text(vendor + "\n")
    (d / "device").write_text(device + "\n")


def test_find_config_disk_waits_for_every_virtio_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev, sysblock, pci = tmp_path / "dev", tmp_path / "block", tmp_path / "pci"
    dev.mkdir()
    sysblock.mkdir()
    _pci(pci, "0000:00:01.0", "0x1af4", "0x1042")  # virtio-blk (boot disk)
    _pci(pci, "0000:00:02.0", "0x1af4", "0x1041")  # virtio-net: not a disk
    _pci(pci, "0000:00:03.0", "0x1af4", "0x1001")  # virtio-blk, transitional (config disk)
    _pci(pci, "0000:00:04.0", "0x8086", "0x1042")  # someone else's device id
    assert cd.expected_disks(os.fspath(pci)) == 2
    for name in ("vda", "vda1", "loop0"):
        (sysblock / name).mkdir()
    (sysblock / "vda1" / "partition").write_text("1\n")
    _vfat(tmp_path, "ESP", None).rename(dev / "vda")
    _vfat(tmp_path, "EECONFIG", b"A=1\n").rename(dev / "loop0")
    _vfat(tmp_path, "EECONFIG", b"A=1\n").rename(dev / "vdb")
    args = (os.fspath(dev), os.fspath(sysblock), os.fspath(pci))

    def config_disk_appears() -> None:
        time.sleep(0.3)
        (sysblock / "vdb").mkdir()

    import threading

    threading.Thread(target=config_disk_appears).start()
    start = time.monotonic()
    assert cd.find_config_disk(5.0, *args) == (os.fspath(dev / "vdb"), "vfat")
    assert 0.3 <= time.monotonic() - start < 2.0
    # No config disk: both virtio disks are there at once, so there is no waiting at all.
    (dev / "vdb").unlink()
    _vfat(tmp_path, "DATA", None).rename(dev / "vdb")
    sleeps: list[float] = []
    with monkeypatch.context() as m:
        m.setattr("eemini.guest.configdisk.time.sleep", sleeps.append)
        assert cd.find_config_disk(5.0, *args) is None
    assert sleeps == []
    # A disk that never appears: the wait is bounded.
    _pci(pci, "0000:00:05.0", "0x1af4", "0x1042")
    start = time.monotonic()
    assert cd.find_config_disk(0.3, *args) is None
    assert time.monotonic() - start >= 0.3


MOUNT_SCRIPT = r"""
import sys
from eemini.guest import bootconfig as bc, configdisk as cd, linux as k
k.mount("none", "/", None, 16384 | 1 << 18)  # MS_REC | MS_PRIVATE
cd.find_config_disk = lambda wait: (sys.argv[1], sys.argv[2])
try:
    print(cd.read_config_disk(0, sys.argv[3]))
except bc.ConfigError as e:
    print("error:", e)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
@pytest.mark.parametrize("kind", ["vfat", "iso9660"])
def test_read_config_disk_mounts_read_only(tmp_path: Path, kind: str) -> None:
    from eemini.run import make_iso9660

    if kind == "vfat":
        img = _vfat(tmp_path, "EECONFIG", b"A=1\n")
    else:
        img = tmp_path / "c.iso"
        make_iso9660(img, {"agent.env": b"A=1\n"}, label="EECONFIG")
    loop = subprocess.run(
        ["losetup", "-f", "--show", "-r", os.fspath(img)], capture_output=True, text=True, check=False
    )
    if loop.returncode != 0:
        pytest.skip(f"no loop devices here: {loop.stderr.strip()}")
    dev = loop.stdout.strip()
    try:
        mnt = tmp_path / "mnt"
        proc = subprocess.run(
            ["unshare", "-m", sys.executable, "-c", MOUNT_SCRIPT, dev, kind, os.fspath(mnt)],
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
    if "cannot be mounted: No such device" in proc.stdout:
        pytest.skip(f"the host kernel has no {kind} driver")
    assert proc.stdout == "b'A=1\\n'\n", proc.stderr


# --- the config disk's agent.env: a regular file, or nothing is read ---

DISK_FLAGS = 1 | 2 | 4 | 8 | 256  # MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOSYMFOLLOW


def _read_fake_disk(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, make: Callable[[Path], object]
) -> tuple[bytes | BaseException | None, list[tuple[object, ...]], bool]:
    """read_config_disk() on /dev/vdb, whose "mount" runs `make(mountpoint)`, on a thread that
    may take 5 s at most: (what it returned or raised, the mount calls, whether it finished)."""
    from eemini.guest import linux

    calls: list[tuple[object, ...]] = []

    def mount(dev: str, target: str, fstype: str, flags: int = 0, options: str | None = None) -> None:
        calls.append(("mount", dev, target, fstype, flags, options))
        make(Path(target))

    def umount(target: str, flags: int = 0) -> None:
        calls.append(("umount", target, flags))

    monkeypatch.setattr(cd, "find_config_disk", lambda wait: ("/dev/vdb", "iso9660"))
    monkeypatch.setattr(linux, "mount", mount)
    monkeypatch.setattr(linux, "umount", umount)
    result: list[bytes | BaseException | None] = []

    def read() -> None:
        try:
            result.append(cd.read_config_disk(0, os.fspath(tmp_path / "mnt")))
        except BaseException as e:  # handed to the test
            result.append(e)

    import threading

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(5)
    if thread.is_alive():  # blocked on a FIFO: give it a writer, so the thread ends
        fifo = tmp_path / "mnt" / "agent.env"
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(5)
        return None, calls, False
    return result[0], calls, True


def test_config_disk_agent_env_read_from_a_nosymfollow_mount(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    got, calls, finished = _read_fake_disk(
        monkeypatch, tmp_path, lambda mnt: (mnt / "AGENT.ENV").write_bytes(b"A=1\n" * 100)
    )
    assert (got, finished) == (b"A=1\n" * 100, True)
    mnt = os.fspath(tmp_path / "mnt")
    assert calls == [
        ("mount", "/dev/vdb", mnt, "iso9660", DISK_FLAGS, "norock"),
        ("umount", mnt, 2),
    ]


def _symlink_to_a_guest_file(mnt: Path) -> None:
    secret = mnt.parent / "secret"
    secret.write_text("TOKEN=not-for-the-console\n")
    (mnt / "agent.env").symlink_to(secret)


def _device_node(mnt: Path) -> None:
    os.mknod(mnt / "agent.env", 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # like /dev/null


def _unix_socket(mnt: Path) -> None:
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.bind(os.fspath(mnt / "agent.env"))


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (_symlink_to_a_guest_file, "a symbolic link"),
        (lambda mnt: os.mkfifo(mnt / "agent.env"), "a FIFO"),
        (lambda mnt: (mnt / "agent.env").mkdir(), "a directory"),
        (_device_node, "a character device"),
        (_unix_socket, "a socket"),
    ],
    ids=["symlink", "fifo", "directory", "device", "socket"],
)
def test_config_disk_agent_env_must_be_a_regular_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, make: Callable[[Path], object], kind: str
) -> None:
    if make is _device_node and os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    got, calls, finished = _read_fake_disk(monkeypatch, tmp_path, make)
    assert finished, "reading agent.env blocked the boot"
    assert isinstance(got, bc.ConfigError), got
    assert str(got) == f"the config disk /dev/vdb: agent.env is {kind}, not a regular file"
    assert calls[-1] == ("umount", os.fspath(tmp_path / "mnt"), 2)


# --- metadata servers ---


def _fetch(server: Server, **kw: float) -> md.Fetch:
    return md.Fetch(
        host="127.0.0.1", port=server.port, timeout=kw.get("timeout", 1.0), attempts=2, backoff=0.05
    )


def test_gce_attribute() -> None:
    b = Behaviour("gce", gce_config=b"UPSTREAM_URL=http://x\n")
    server = Server(b).start()
    try:
        got = md.collect([S.GCE_METADATA], _fetch(server), print)
    finally:
        server.shutdown()
    assert [(s.source, s.key, s.value) for s in got] == [(S.GCE_METADATA, "UPSTREAM_URL", "http://x")]
    path, headers = b.requests[0]
    assert path == "/computeMetadata/v1/instance/attributes/ee-config"
    assert headers["metadata-flavor"] == "Google"
    assert "x-forwarded-for" not in headers


def test_gce_absent_attribute_and_absent_server(capsys: pytest.CaptureFixture[str]) -> None:
    server = Server(Behaviour("gce")).start()
    try:
        assert md.collect([S.GCE_METADATA], _fetch(server), print) == []
    finally:
        server.shutdown()
    # Nothing listening at all: bounded retries, then absent.
    start = time.monotonic()
    assert md.read_gce(md.Fetch(host="127.0.0.1", port=1, timeout=0.2, attempts=3, backoff=0.05)) is None
    assert time.monotonic() - start < 2
    assert capsys.readouterr().out == "boot config: no GCE ee-config attribute\n"


def test_gce_slow_server_times_out_then_absent() -> None:
    b = Behaviour("gce", gce_config=b"A=1\n", delay=0.6)
    server = Server(b).start()
    try:
        start = time.monotonic()
        assert md.read_gce(_fetch(server, timeout=0.2)) is None
        assert time.monotonic() - start < 1.5
        # Both attempts were made (the server thread may record the second one a moment later).
        deadline = time.monotonic() + 10
        while len(b.requests) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(b.requests) == 2
        # A slow but sufficient timeout gets the answer.
        assert md.read_gce(_fetch(server, timeout=2)) == b"A=1\n"
    finally:
        server.shutdown()


def test_gce_retries_a_starting_server() -> None:
    b = Behaviour("gce", gce_config=b"A=1\n", fail_first=1)
    server = Server(b).start()
    try:
        assert md.read_gce(_fetch(server)) == b"A=1\n"
    finally:
        server.shutdown()
    assert len(b.requests) == 2


def test_gce_impostor_without_flavor_header() -> None:
    import http.server
    import threading

    class Plain(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "4")
            self.end_headers()
            self.wfile.write(b"A=1\n")

    srv = http.server.HTTPServer(("127.0.0.1", 0), Plain)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with pytest.raises(
            bc.ConfigError, match="gce-metadata: the answer lacks the 'Metadata-Flavor: Google' header"
        ):
            md.read_gce(md.Fetch(host="127.0.0.1", port=srv.server_address[1], timeout=1, attempts=1))
    finally:
        srv.shutdown()


def test_fake_gce_refuses_without_header() -> None:
    import http.client

    server = Server(Behaviour("gce", gce_config=b"A=1\n")).start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=2)
        conn.request("GET", "/computeMetadata/v1/instance/attributes/ee-config")
        assert conn.getresponse().status == 403
    finally:
        server.shutdown()


def test_azure_userdata_first_then_customdata() -> None:
    b = Behaviour("azure", azure_userdata=b"A=user\n", azure_customdata=b"A=custom\n")
    server = Server(b).start()
    try:
        assert imds.read_user_data(_fetch(server)) == (imds.AZURE_USERDATA, b"A=user\n")
        b.azure_userdata = None
        assert imds.read_user_data(_fetch(server)) == (imds.AZURE_CUSTOMDATA, b"A=custom\n")
        b.azure_customdata = None
        assert imds.read_user_data(_fetch(server)) is None
    finally:
        server.shutdown()
    paths = [p for p, _ in b.requests]
    assert paths[:3] == [imds.AZURE_USERDATA_PATH, imds.AZURE_USERDATA_PATH, imds.AZURE_CUSTOMDATA_PATH]
    assert all(h["metadata"] == "true" for _, h in b.requests)


def test_azure_errors() -> None:
    b = Behaviour("azure", azure_userdata=b"A=1\n")
    server = Server(b).start()
    try:
        with pytest.raises(bc.ConfigError, match="azure-userdata: IMDS answered HTTP 400"):
            imds._read_imds(_fetch(server), "/metadata/instance/compute/userData", imds.AZURE_USERDATA)
    finally:
        server.shutdown()


def test_azure_not_base64() -> None:
    import http.server
    import threading

    class Bad(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"A=1!\n")

    srv = http.server.HTTPServer(("127.0.0.1", 0), Bad)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with pytest.raises(bc.ConfigError, match="azure-userdata: the IMDS answer is not base64"):
            imds.read_user_data(
                md.Fetch(host="127.0.0.1", port=srv.server_address[1], timeout=1, attempts=1)
            )
    finally:
        srv.shutdown()


IDNA_SCRIPT = r"""
import sys
sys.modules["encodings.idna"] = None  # like the image's trimmed standard library
import socket
from eemini.guest import metadata as md
port = int(sys.argv[1])
try:
    socket.create_connection(("127.0.0.1", port), timeout=2).close()
    print("create_connection works")
except LookupError as e:
    print("create_connection:", e)
print(md.read_gce(md.Fetch(host="127.0.0.1", port=port, timeout=2, attempts=1)))
"""


def test_metadata_fetch_works_without_the_idna_codec() -> None:
    server = Server(Behaviour("gce", gce_config=b"A=1\n")).start()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", IDNA_SCRIPT, str(server.port)],
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        server.shutdown()
    assert proc.stdout == "create_connection: unknown encoding: idna\nb'A=1\\n'\n", proc.stderr
