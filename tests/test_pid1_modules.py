"""PID 1's module loader: which modules the boot waits for before the workload starts."""

from __future__ import annotations

import pytest

from eemini.guest.pid1 import ModuleLoader, module_name


def test_module_names_as_the_kernel_spells_them() -> None:
    assert module_name("/usr/lib/modules/6.12/kernel/drivers/acpi/button.ko") == "button"
    assert module_name("/x/virtio-net.ko.xz") == "virtio_net"


def test_trailing_power_button_drivers_load_after_the_workload_starts() -> None:
    loader = ModuleLoader(["/m/configfs.ko", "/m/virtio_net.ko", "/m/button.ko", "/m/evdev.ko"])
    assert loader.boot_paths == ["/m/configfs.ko", "/m/virtio_net.ko"]
    assert loader.late_paths == ["/m/button.ko", "/m/evdev.ko"]


def test_a_power_button_driver_before_others_is_waited_for() -> None:
    loader = ModuleLoader(["/m/button.ko", "/m/virtio_net.ko", "/m/evdev.ko"])
    assert loader.boot_paths == ["/m/button.ko", "/m/virtio_net.ko"]
    assert loader.late_paths == ["/m/evdev.ko"]
    assert ModuleLoader([]).boot_paths == []


def test_missing_modules_are_reported_and_both_parts_finish(
    capfd: pytest.CaptureFixture[str],
) -> None:
    loader = ModuleLoader(["/nonexistent/a.ko", "/nonexistent/evdev.ko"])
    loader.start()
    loader.wait_boot()
    assert loader.boot_done.is_set()
    loader.join()
    assert (loader.loaded, loader.late_loaded) == (0, 0)
    assert capfd.readouterr().err.splitlines() == [
        "eemini: module a.ko: No such file or directory",
        "eemini: module evdev.ko: No such file or directory",
    ]
