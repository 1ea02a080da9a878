"""The kernel: the fragment's format and checks, the committed configuration, the cache key, the
progress line, the tools tree runner; and the cached build itself (built once per test session by
whichever test or image build needs it first)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from eemini.build import apt, kernel, lock
from eemini.log import UserError

CONFIG = kernel.RESOLVED.read_text()
FRAGMENT = kernel.FRAGMENT.read_text()


# --- the fragment ---


def test_fragment_lines_are_options_with_reasons() -> None:
    options = kernel.parse_fragment(
        "# a comment\n\nCONFIG_A=y  # why a\nCONFIG_B=n # why not b\n"
        'CONFIG_C="x y"  # a string\nCONFIG_D=-1  # a number\nCONFIG_E=0x10  # hex\n'
    )
    assert options == [
        kernel.Option("CONFIG_A", "y", "why a", 3),
        kernel.Option("CONFIG_B", "n", "why not b", 4),
        kernel.Option("CONFIG_C", '"x y"', "a string", 5),
        kernel.Option("CONFIG_D", "-1", "a number", 6),
        kernel.Option("CONFIG_E", "0x10", "hex", 7),
    ]
    assert kernel.kconfig_fragment(options) == (
        'CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C="x y"\nCONFIG_D=-1\nCONFIG_E=0x10\n'
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("CONFIG_A=y\n", "f.config:1: 'CONFIG_A=y' has no reason (write `# why` after the value)"),
        ("CONFIG_A=y  #\n", "f.config:1: 'CONFIG_A=y  #' has no reason (write `# why` after the value)"),
        ("A=y  # x\n", "f.config:1: not an option line (`CONFIG_NAME=VALUE  # reason`): 'A=y  # x'"),
        (
            "CONFIG_A=m  # x\n",
            "f.config:1: not an option line (`CONFIG_NAME=VALUE  # reason`): 'CONFIG_A=m  # x'",
        ),
        ("CONFIG_A=y  # x\n\nCONFIG_A=n  # y\n", "f.config:3: CONFIG_A is set twice (also on line 1)"),
        ("# nothing\n", "f.config sets no options"),
    ],
)
def test_bad_fragments_are_refused_with_the_line(text: str, message: str) -> None:
    with pytest.raises(UserError) as e:
        kernel.parse_fragment(text, "f.config")
    assert str(e.value) == message


def test_check_fragment_names_every_option_that_did_not_come_out() -> None:
    options = kernel.parse_fragment(
        'CONFIG_A=y  # a\nCONFIG_B=n  # b\nCONFIG_C=y  # c\nCONFIG_D="s"  # d\n'
    )
    kernel.check_fragment(options, 'CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=y\nCONFIG_D="s"\n')
    with pytest.raises(UserError) as e:
        kernel.check_fragment(options, 'CONFIG_A=y\nCONFIG_B=y\nCONFIG_D="t"\n')
    assert str(e.value) == (
        "the kernel configuration does not have what kernel/fragment.config asks for: "
        "CONFIG_B=n (line 2) came out as y; CONFIG_C=y (line 3) came out as unset; "
        'CONFIG_D="s" (line 4) came out as "t"'
    )
    assert e.value.hint is not None and e.value.hint.startswith("an option was renamed or removed")


def test_config_difference_lists_options() -> None:
    a = "# header\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=1\n"
    b = "# other header\nCONFIG_A=y\nCONFIG_B=y\nCONFIG_D=y\n"
    assert kernel.config_difference(a, b) == [
        "CONFIG_B: n -> y", "CONFIG_C: 1 -> absent", "CONFIG_D: absent -> y"
    ]  # fmt: skip
    assert kernel.config_difference(a, a.replace("# header", "# changed")) == [
        "(the same options; comments or order differ)"
    ]
    assert kernel.config_difference(a, a) == []


# --- the committed configuration ---


def test_the_committed_config_has_every_option_of_the_fragment() -> None:
    options = kernel.parse_fragment(FRAGMENT)
    kernel.check_fragment(options, CONFIG)
    assert len(options) == 188
    assert len(kernel.enabled_options(CONFIG)) == 894
    assert CONFIG.splitlines()[2] == "# Linux/x86_64 7.3.4 Kernel Configuration"


@pytest.mark.parametrize(
    ("option", "value"),
    [
        # What the issue asks for: no modules, TDX guest with configfs-tsm and the sysfs RTMR ABI.
        ("CONFIG_MODULES", "n"),
        ("CONFIG_INTEL_TDX_GUEST", "y"),
        ("CONFIG_TDX_GUEST_DRIVER", "y"),
        ("CONFIG_TSM_REPORTS", "y"),
        ("CONFIG_TSM_MEASUREMENTS", "y"),
        ("CONFIG_CONFIGFS_FS", "y"),
        ("CONFIG_UNACCEPTED_MEMORY", "y"),
        ("CONFIG_EFI_STUB", "y"),
        ("CONFIG_RD_ZSTD", "y"),
        ("CONFIG_VIRTIO_NET", "y"),
        ("CONFIG_VIRTIO_BLK", "y"),
        ("CONFIG_HW_RANDOM_VIRTIO", "y"),
        ("CONFIG_GVE", "y"),
        ("CONFIG_HYPERV_NET", "y"),
        ("CONFIG_TCG_CRB", "y"),
        ("CONFIG_TCG_TIS", "y"),
        ("CONFIG_SECURITYFS", "y"),
        ("CONFIG_VFAT_FS", "y"),
        ("CONFIG_ISO9660_FS", "y"),
        ("CONFIG_ACPI_BUTTON", "y"),
        ("CONFIG_INPUT_EVDEV", "y"),
        ("CONFIG_SERIAL_8250_CONSOLE", "y"),
        # Hardening that costs nothing.
        ("CONFIG_STACKPROTECTOR_STRONG", "y"),
        ("CONFIG_STRICT_KERNEL_RWX", "y"),
        ("CONFIG_RANDOMIZE_BASE", "y"),
        ("CONFIG_DEBUG_INFO_NONE", "y"),
        ("CONFIG_BPF_SYSCALL", "n"),
        ("CONFIG_BPF_JIT", "n"),
        ("CONFIG_IO_URING", "n"),
        ("CONFIG_KEXEC", "n"),
        ("CONFIG_DEVMEM", "n"),
        ("CONFIG_SWAP", "n"),
        ("CONFIG_IA32_EMULATION", "n"),
        # Reproducibility and identity.
        ("CONFIG_BUILD_SALT", '"eemini"'),
        ("CONFIG_LOCALVERSION", '"-eemini"'),
        ("CONFIG_LOCALVERSION_AUTO", "n"),
    ],
)
def test_the_committed_config_has(option: str, value: str) -> None:
    assert kernel.parse_config(CONFIG).get(option, "n") == value


# --- the cache key and the recipe ---


def test_the_cache_key_covers_every_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pins = lock.load()
    base = kernel.cache_key(pins, FRAGMENT, CONFIG)
    assert re.fullmatch(r"[0-9a-f]{64}", base)
    assert kernel.cache_key(pins, FRAGMENT, CONFIG) == base
    other_source = dataclasses.replace(pins.kernel, sha256="0" * 64)
    changed = dataclasses.replace(
        pins, packages=tuple(other_source if p is pins.kernel else p for p in pins.packages)
    )
    other_tool = dataclasses.replace(pins.toolchain[0], version="9:9")
    tools = dataclasses.replace(pins, toolchain=(other_tool, *pins.toolchain[1:]))
    keys = {
        base,
        kernel.cache_key(changed, FRAGMENT, CONFIG),
        kernel.cache_key(tools, FRAGMENT, CONFIG),
        kernel.cache_key(pins, FRAGMENT + "\n", CONFIG),
        kernel.cache_key(pins, FRAGMENT, CONFIG + "\n"),
    }
    (tmp_path / "0001-x.patch").write_text("--- a\n+++ b\n")
    monkeypatch.setattr(kernel, "PATCHES", tmp_path)
    keys.add(kernel.cache_key(pins, FRAGMENT, CONFIG))
    monkeypatch.setattr(kernel, "RECIPE", kernel.RECIPE + 1)
    keys.add(kernel.cache_key(pins, FRAGMENT, CONFIG))
    assert len(keys) == 7


def test_make_carries_the_reproducibility_knobs() -> None:
    assert kernel.make_args(2) == [
        "make", "-j2", "ARCH=x86_64", "CC=x86_64-linux-gnu-gcc-14", "HOSTCC=x86_64-linux-gnu-gcc-14",
        "KBUILD_BUILD_TIMESTAMP=Thu Jan  1 00:00:00 UTC 1970", "KBUILD_BUILD_USER=eemini",
        "KBUILD_BUILD_HOST=eemini", "KBUILD_BUILD_VERSION=1",
        "KCFLAGS=-fdebug-prefix-map=/build/linux=.",
    ]  # fmt: skip


def test_jobs_come_from_the_environment_or_the_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EEMINI_KERNEL_JOBS", "3")
    assert kernel.jobs() == 3
    monkeypatch.setenv("EEMINI_KERNEL_JOBS", "0")
    with pytest.raises(UserError, match=r"^EEMINI_KERNEL_JOBS must be a positive number, not '0'$"):
        kernel.jobs()
    monkeypatch.delenv("EEMINI_KERNEL_JOBS")
    assert kernel.jobs() == len(os.sched_getaffinity(0))


def test_progress_is_one_line_per_tenth_without_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    progress = kernel.Progress(20)
    for i in range(25):
        progress.line(f"  CC      kernel/f{i}.o\n".encode())
        progress.line(b"In file included from x.c:1:\n")  # compiler chatter is not a step
    progress.finish()
    lines = err.getvalue().splitlines()
    assert progress.steps == 25
    assert [re.sub(r"\d+:\d\d$", "T", line) for line in lines] == [
        f"  [{n:>5}/~20] {p:>2}%  T" for n, p in ((1, 5), (2, 10), (4, 20), (6, 30), (8, 40),
                                                (10, 50), (12, 60), (14, 70), (16, 80), (18, 90))
    ]  # fmt: skip


# --- the tools tree and the build ---


def test_absolute_symlinks_in_the_tools_tree_stay_inside_it(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "usr/lib").mkdir(parents=True)
    (tree / "usr/lib64").symlink_to("/usr/lib")
    (tree / "usr/bin").mkdir()
    (tree / "usr/bin/awk").symlink_to("gawk")
    (tree / "etc").mkdir()
    (tree / "etc/alt").symlink_to("/etc/alternatives/x")
    assert kernel.relativize_symlinks(tree) == 2
    assert os.readlink(tree / "usr/lib64") == "lib"
    assert os.readlink(tree / "usr/bin/awk") == "gawk"
    assert os.readlink(tree / "etc/alt") == "alternatives/x"
    assert (tree / "usr/lib64").resolve() == (tree / "usr/lib").resolve()


@pytest.fixture(scope="module")
def built() -> kernel.Kernel:
    """The session's kernel: from the cache, or built now (once; every image build uses it)."""
    return kernel.ensure(apt.Apt(), lock.load())


def test_the_tools_tree_runs_the_pinned_compiler_in_isolation(
    built: kernel.Kernel, tmp_path: Path
) -> None:
    tree = kernel.tools_tree(apt.Apt(), lock.load())
    assert tree.name == kernel.toolchain_key(lock.load().toolchain)
    script = (
        "x86_64-linux-gnu-gcc-14 --version | head -1; ls /dev | tr '\\n' ' '; echo; "
        "env | sort | tr '\\n' ' '; echo; umask; touch /usr/x 2>/dev/null || echo read-only; "
        "echo data > /build/out"
    )
    proc = subprocess.run(kernel._runner(tree, tmp_path, script), capture_output=True, text=True,
                          check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "x86_64-linux-gnu-gcc-14 (Debian 14.2.0-19) 14.2.0",
        "full null random urandom zero ",
        "HOME=/build LC_ALL=C PATH=/usr/bin PWD=/ SHLVL=1 TZ=UTC _=/usr/bin/env ",
        "0022",
        "read-only",
    ]
    assert (tmp_path / "out").read_text() == "data\n"
    assert not (tree / "usr" / "x").exists()


def test_the_cached_kernel_is_what_the_lock_and_config_say(built: kernel.Kernel) -> None:
    pins = lock.load()
    info = built.info()
    assert built.release == info["release"] == "7.3.4-eemini"
    assert built.key == kernel.cache_key(pins, FRAGMENT, CONFIG)
    assert built.path == apt.cache_dir() / "kernel" / built.key
    assert info["source"] == {"name": "linux-source-7.3", "version": "7.3.4-1~bpo13+1",
                              "sha256": pins.kernel.sha256}  # fmt: skip
    assert info["toolchain"] == kernel.toolchain_key(pins.toolchain)
    assert built.config.read_text() == CONFIG
    assert info["config_sha256"] == hashlib.sha256(CONFIG.encode()).hexdigest()
    data = built.bzimage.read_bytes()
    assert info["bzimage_sha256"] == hashlib.sha256(data).hexdigest()
    assert info["bzimage_size"] == len(data)
    assert info["options_on"] == 894
    # An x86 boot image (Documentation/arch/x86/boot.rst): "HdrS" at 0x202, the version string
    # the header points at (0x20E, relative to 0x200) with the fixed user, host and timestamp.
    assert data[0x202:0x206] == b"HdrS"
    at = int.from_bytes(data[0x20E:0x210], "little") + 0x200
    version = data[at : data.index(b"\0", at)].decode()
    assert version == "7.3.4-eemini (eemini@eemini) #1 SMP PREEMPT Thu Jan  1 00:00:00 UTC 1970"
    assert (
        (built.path / "build.log")
        .read_text()
        .rstrip()
        .endswith("Kernel: arch/x86/boot/bzImage is ready  (#1)")
    )
    assert json.loads((built.path / "build.json").read_text()) == info


def test_eemini_kernel_prints_the_cached_kernel(built: kernel.Kernel) -> None:
    proc = subprocess.run([sys.executable, "-m", "eemini", "kernel"], capture_output=True, text=True,
                          check=True)  # fmt: skip
    info = built.info()
    assert proc.stdout.splitlines() == [
        "release\t7.3.4-eemini",
        f"bzImage\t{built.bzimage}",
        f"sha256\t{info['bzimage_sha256']}",
        f"size\t{info['bzimage_size']}",
        "options_on\t894",
        f"build_seconds\t{info['build_seconds']}",
    ]
    assert proc.stderr == (
        "‣ Kernel 7.3.4-eemini from the cache (built earlier from linux-source-7.3 7.3.4-1~bpo13+1)\n"
    )


def test_a_config_that_differs_from_the_committed_one_is_refused(
    built: kernel.Kernel, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The committed config no longer matches what olddefconfig gives: the build stops before
    compiling, naming the options (configuring takes about a minute; nothing is compiled)."""
    # An option the fragment does not name (the fragment's own are checked first, see above).
    wrong = CONFIG.replace("CONFIG_LOG_BUF_SHIFT=17", "CONFIG_LOG_BUF_SHIFT=18")
    assert wrong != CONFIG
    (tmp_path / "config").write_text(wrong)
    monkeypatch.setattr(kernel, "RESOLVED", tmp_path / "config")
    monkeypatch.setenv("EEMINI_CACHE_DIR", os.fspath(apt.cache_dir()))
    with pytest.raises(UserError) as e:
        kernel.ensure(apt.Apt(), lock.load())
    assert str(e.value) == (
        "the kernel configuration after olddefconfig differs from the committed kernel/config: "
        "CONFIG_LOG_BUF_SHIFT: 18 -> 17"
    )
    key = kernel.cache_key(lock.load(), FRAGMENT, wrong)
    failed = apt.cache_dir() / "kernel" / f"{key}.failed.log"
    assert "olddefconfig" in failed.read_text()
    failed.unlink()
    assert not (apt.cache_dir() / "kernel" / key).exists()
