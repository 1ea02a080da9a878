"""Which of the image's kernel modules a boot loads, and when.

The builder lists the profile's modules and their dependencies in load order (image.json
`modules`) and records, for each, the aliases and dependencies from its `.modinfo` and whether
the profile asked for it (`module_facts`). Loading a module costs the kernel a signature check,
relocation and the driver's init, about 15-40 ms each under TCG, so PID 1 loads what this
machine needs, the way udev's coldplug does:

- a device driver (an alias on the pci, virtio or acpi bus) when a device on that bus matches one
  of its aliases (`/sys/bus/*/devices/*/modalias`, fnmatch patterns as modprobe matches them);
- a filesystem (an `fs-TYPE` alias) only when PID 1 mounts that type; the NLS tables
  (`nls_*`) go with vfat, whose mount options name them;
- anything else (a CPU-feature driver such as tdx_guest, evdev) always;
- each with its dependencies first, in the build-time order.

The power-button drivers (`button`, `evdev`) load once the workload has started. Without
`module_facts` (an older image) every module loads, in order.
"""

from __future__ import annotations

import fnmatch
import os
import threading
import time

from eemini.guest import linux as ksys
from eemini.guest.record import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping
    from typing import Any

DEVICE_BUSES = ("pci", "virtio", "acpi")
# Drivers only the power-button watch needs (it starts with the workload).
AFTER_WORKLOAD = frozenset({"button", "evdev"})


def module_name(path: str) -> str:
    return os.path.basename(path).split(".", 1)[0].replace("-", "_")


def device_modaliases(sys_bus: str = "/sys/bus") -> list[str]:
    """The modalias of every device on the buses whose drivers are chosen by device."""
    found = []
    for bus in DEVICE_BUSES:
        devices = os.path.join(sys_bus, bus, "devices")
        try:
            names = sorted(os.listdir(devices))
        except OSError:
            continue
        for name in names:
            try:
                with open(os.path.join(devices, name, "modalias")) as f:
                    found.append(f.read().strip())
            except OSError:
                continue
    return found


def _bus(alias: str) -> str:
    # "pci:v00001AF4d...", "virtio:d00000001v*", "acpi*:PNP0C0C:*"
    return alias.split(":", 1)[0].rstrip("*")


@record
class Plan:
    """Module paths in load order: `boot` before the boot goes on, `late` after the workload
    starts, `on_demand[fstype]` before mounting that filesystem; `absent` names the drivers
    left out because no device needs them."""

    boot: list[str]
    late: list[str]
    on_demand: dict[str, list[str]]
    absent: list[str]


def plan(paths: list[str], facts: Mapping[str, Any] | None, devices: Iterable[str]) -> Plan:
    """Decide which modules load when (see the module docstring)."""
    names = [module_name(p) for p in paths]
    path_of = dict(zip(names, paths, strict=True))
    if not facts:
        cut = len(paths)
        while cut > 0 and names[cut - 1] in AFTER_WORKLOAD:
            cut -= 1
        return Plan(list(paths[:cut]), list(paths[cut:]), {}, [])
    devices = list(devices)

    def info(name: str) -> tuple[list[str], list[str], bool]:
        entry = facts.get(name)
        if not isinstance(entry, dict):
            return [], [], False
        aliases = [a for a in entry.get("aliases", []) if isinstance(a, str)]
        depends = [d for d in entry.get("depends", []) if isinstance(d, str)]
        return aliases, depends, bool(entry.get("requested"))

    def closure(roots: Iterable[str]) -> set[str]:
        out: set[str] = set()
        todo = [r for r in roots if r in path_of]
        while todo:
            name = todo.pop()
            if name not in out:
                out.add(name)
                todo += [d for d in info(name)[1] if d in path_of]
        return out

    def ordered(chosen: set[str]) -> list[str]:
        return [path_of[n] for n in names if n in chosen]

    wanted: list[str] = []
    filesystems: dict[str, list[str]] = {}
    nls: list[str] = []
    absent: list[str] = []
    for name in names:
        aliases, _, requested = info(name)
        if not requested:
            continue  # a dependency: loaded with what needs it
        fs = [a[3:] for a in aliases if a.startswith("fs-")]
        driver = [a for a in aliases if _bus(a) in DEVICE_BUSES]
        if fs:
            for t in fs:
                filesystems.setdefault(t, []).append(name)
        elif name.startswith("nls_"):
            nls.append(name)
        elif driver:
            if any(fnmatch.fnmatchcase(d, a) for a in driver for d in devices):
                wanted.append(name)
            else:
                absent.append(name)
        else:
            wanted.append(name)
    if nls:
        filesystems.setdefault("vfat", []).extend(nls)
    boot = closure(n for n in wanted if n not in AFTER_WORKLOAD)
    late = closure(n for n in wanted if n in AFTER_WORKLOAD) - boot
    on_demand = {t: ordered(closure(roots)) for t, roots in sorted(filesystems.items())}
    return Plan(ordered(boot), ordered(late), on_demand, absent)


def load_modules(paths: Iterable[str], log: Callable[[str], None]) -> int:
    """finit_module each path in order; failures are reported, not fatal."""
    loaded = 0
    for path in paths:
        try:
            if ksys.load_module(path):
                loaded += 1
        except OSError as e:
            log(f"module {os.path.basename(path)}: {e.strerror}")
    return loaded


class ModuleLoader:
    """Carries out a Plan: `boot` on a thread from start(), `late` through load_late() and
    `on_demand` through require_fs(), both in the caller's thread.

    wait_boot() before anything needs a driver; load_late() once the workload has started.
    """

    def __init__(self, plan: Plan, log: Callable[[str], None]) -> None:
        self.plan, self.log = plan, log
        self.loaded = self.late_loaded = 0
        self.elapsed = self.late_elapsed = 0.0
        self.boot_done = threading.Event()
        self.done: set[str] = set()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="eemini-modules", daemon=True)

    def _load(self, paths: Iterable[str]) -> int:
        with self.lock:
            todo = [p for p in paths if p not in self.done]
            self.done.update(todo)
            return load_modules(todo, self.log)

    def _run(self) -> None:
        start = time.monotonic()
        try:
            self.loaded = self._load(self.plan.boot)
        finally:
            self.elapsed = time.monotonic() - start
            self.boot_done.set()

    def start(self) -> None:
        self.thread.start()

    def wait_boot(self) -> None:
        self.boot_done.wait()

    def load_late(self) -> None:
        self.wait_boot()
        start = time.monotonic()
        self.late_loaded = self._load(self.plan.late)
        self.late_elapsed = time.monotonic() - start

    def require_fs(self, fstype: str) -> int:
        """Load the modules a mount of `fstype` needs (none when it is built in or loaded)."""
        return self._load(self.plan.on_demand.get(fstype, []))
