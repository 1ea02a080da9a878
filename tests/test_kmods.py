"""PID 1's module plan: which of the image's modules a machine loads, and when."""

from __future__ import annotations

from pathlib import Path

import pytest

from eemini.guest import kmods

M = "/usr/lib/modules/6.12/kernel"
# The local-dev profile's modules in build-time order, with the facts the builder records
# (aliases and dependencies as Debian 6.12.118's .modinfo has them).
PATHS = [
    f"{M}/fs/configfs/configfs.ko",
    f"{M}/net/core/failover.ko",
    f"{M}/drivers/net/net_failover.ko",
    f"{M}/drivers/net/virtio_net.ko",
    f"{M}/drivers/block/virtio_blk.ko",
    f"{M}/fs/fat/fat.ko",
    f"{M}/fs/fat/vfat.ko",
    f"{M}/fs/nls/nls_cp437.ko",
    f"{M}/fs/nls/nls_utf8.ko",
    f"{M}/drivers/cdrom/cdrom.ko",
    f"{M}/fs/isofs/isofs.ko",
    f"{M}/drivers/acpi/button.ko",
    f"{M}/drivers/input/evdev.ko",
]
BUTTON = [
    "acpi*:LNXPWRBN:*",
    "acpi*:LNXSLPBN:*",
    "acpi*:PNP0C0C:*",
    "acpi*:PNP0C0D:*",
    "acpi*:PNP0C0E:*",
]
FACTS = {
    "configfs": {"aliases": ["fs-configfs"], "depends": [], "requested": True},
    "failover": {"aliases": [], "depends": [], "requested": False},
    "net_failover": {"aliases": [], "depends": ["failover"], "requested": False},
    "virtio_net": {"aliases": ["virtio:d00000001v*"], "depends": ["net_failover"], "requested": True},
    "virtio_blk": {"aliases": ["virtio:d00000002v*"], "depends": [], "requested": True},
    "fat": {"aliases": [], "depends": [], "requested": False},
    "vfat": {"aliases": ["fs-vfat"], "depends": ["fat"], "requested": True},
    "nls_cp437": {"aliases": [], "depends": [], "requested": True},
    "nls_utf8": {"aliases": [], "depends": [], "requested": True},
    "cdrom": {"aliases": [], "depends": [], "requested": False},
    "isofs": {"aliases": ["fs-iso9660", "iso9660"], "depends": ["cdrom"], "requested": True},
    "button": {"aliases": BUTTON, "depends": [], "requested": True},
    "evdev": {"aliases": ["input:b*v*p*e*-e*k*r*a*m*l*s*f*w*"], "depends": [], "requested": True},
}
# Modaliases of QEMU q35 devices as the guest's sysfs shows them.
NET = "virtio:d00000001v00001AF4"
BLK = "virtio:d00000002v00001AF4"
POWER_BUTTON = "acpi:LNXPWRBN:"
RNG = "virtio:d00000004v00001AF4"


def names(paths: list[str]) -> list[str]:
    return [kmods.module_name(p) for p in paths]


def test_module_names_as_the_kernel_spells_them() -> None:
    assert kmods.module_name("/usr/lib/modules/6.12/kernel/drivers/acpi/button.ko") == "button"
    assert kmods.module_name("/x/virtio-net.ko.xz") == "virtio_net"


def test_a_machine_without_disks_loads_no_disk_driver_and_mounts_decide_filesystems() -> None:
    plan = kmods.plan(PATHS, FACTS, [NET, POWER_BUTTON, RNG])
    assert names(plan.boot) == ["failover", "net_failover", "virtio_net"]
    assert names(plan.late) == ["button", "evdev"]
    assert plan.absent == ["virtio_blk"]
    assert {t: names(p) for t, p in plan.on_demand.items()} == {
        "configfs": ["configfs"],
        "iso9660": ["cdrom", "isofs"],
        "vfat": ["fat", "vfat", "nls_cp437", "nls_utf8"],
    }


def test_a_disk_brings_its_driver_into_the_boot() -> None:
    plan = kmods.plan(PATHS, FACTS, [BLK, NET])
    assert names(plan.boot) == ["failover", "net_failover", "virtio_net", "virtio_blk"]
    # No ACPI power button device: only evdev (not a device driver) is left for later.
    assert names(plan.late) == ["evdev"]
    assert plan.absent == ["button"]


def test_a_dependency_shared_with_the_boot_is_loaded_once() -> None:
    facts = {
        "tsm": {"aliases": [], "depends": ["configfs"], "requested": False},
        "configfs": {"aliases": ["fs-configfs"], "depends": [], "requested": False},
        "tdx_guest": {
            "aliases": ["cpu:type:x86,ven*fam*mod*:feature:*0116*"],
            "depends": ["tsm"],
            "requested": True,
        },
    }
    plan = kmods.plan(["/m/configfs.ko", "/m/tsm.ko", "/m/tdx_guest.ko"], facts, [])
    # A CPU-feature alias is not a bus this plan matches devices on: it always loads.
    assert names(plan.boot) == ["configfs", "tsm", "tdx_guest"]
    assert (plan.late, plan.on_demand, plan.absent) == ([], {}, [])


def test_pci_aliases_match_like_modprobe() -> None:
    gve = {
        "gve": {"aliases": ["pci:v00001AE0d00000042sv*sd*bc*sc*i*"], "depends": [], "requested": True}
    }
    present = "pci:v00001AE0d00000042sv00001AE0sd00000058bc02sc00i00"
    assert names(kmods.plan(["/m/gve.ko"], gve, [present]).boot) == ["gve"]
    other = "pci:v00001AF4d00001000sv00001AF4sd00000001bc02sc00i00"
    assert kmods.plan(["/m/gve.ko"], gve, [other]).absent == ["gve"]


def test_without_facts_everything_loads_and_trailing_button_drivers_wait() -> None:
    plan = kmods.plan(["/m/configfs.ko", "/m/virtio_net.ko", "/m/button.ko", "/m/evdev.ko"], None, [])
    assert names(plan.boot) == ["configfs", "virtio_net"]
    assert names(plan.late) == ["button", "evdev"]
    plan = kmods.plan(["/m/button.ko", "/m/virtio_net.ko", "/m/evdev.ko"], None, [])
    assert names(plan.boot) == ["button", "virtio_net"]
    assert names(plan.late) == ["evdev"]
    assert kmods.plan([], None, []).boot == []


def test_device_modaliases_reads_the_three_buses(tmp_path: Path) -> None:
    for bus, dev, alias in [
        ("virtio", "virtio1", NET),
        ("virtio", "virtio0", RNG),
        ("acpi", "LNXPWRBN:00", POWER_BUTTON),
        ("platform", "serial8250", "platform:serial8250"),
    ]:
        (tmp_path / bus / "devices" / dev).mkdir(parents=True)
        (tmp_path / bus / "devices" / dev / "modalias").write_text(alias + "\n")
    (tmp_path / "acpi" / "devices" / "LNXSYSTM:00").mkdir()  # no modalias file
    assert kmods.device_modaliases(str(tmp_path)) == [RNG, NET, POWER_BUTTON]


def test_missing_modules_are_reported_and_every_phase_finishes(
    capfd: pytest.CaptureFixture[str],
) -> None:
    facts = {
        "a": {"aliases": [], "depends": [], "requested": True},
        "evdev": {"aliases": [], "depends": [], "requested": True},
        "vfat": {"aliases": ["fs-vfat"], "depends": [], "requested": True},
    }
    paths = ["/nonexistent/a.ko", "/nonexistent/vfat.ko", "/nonexistent/evdev.ko"]
    loader = kmods.ModuleLoader(kmods.plan(paths, facts, []), kmods_log)
    loader.start()
    loader.wait_boot()
    assert loader.boot_done.is_set()
    assert loader.require_fs("vfat") == 0
    assert loader.require_fs("vfat") == 0  # tried once only
    assert loader.require_fs("btrfs") == 0  # nothing in the image for it
    loader.load_late()
    assert (loader.loaded, loader.late_loaded) == (0, 0)
    assert capfd.readouterr().err.splitlines() == [
        "module a.ko: No such file or directory",
        "module vfat.ko: No such file or directory",
        "module evdev.ko: No such file or directory",
    ]


def kmods_log(text: str) -> None:
    import sys

    print(text, file=sys.stderr)
