"""Kernel modules for a profile and their load order, computed at build time.

Debian's kernel package ships no modules.dep (its postinst runs depmod on the target), so the
dependency data is read where depmod's comes from in the first place: the `depends=` (and
`softdep=pre:`) entries modpost records in each module's `.modinfo` section.
"""

from __future__ import annotations

import dataclasses
import lzma
from pathlib import Path, PurePosixPath

from eemini.build import elf
from eemini.log import die

_SUFFIXES = (".ko.xz", ".ko.zst", ".ko.gz", ".ko")


def _name_of(path: Path) -> str:
    name = path.name
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)].replace("-", "_")
    raise ValueError(path)


@dataclasses.dataclass(frozen=True)
class Module:
    name: str
    path: PurePosixPath  # path inside the image, absolute
    source: Path  # file in the unpacked kernel package
    depends: tuple[str, ...]


class KernelTree:
    """The modules of one unpacked kernel package."""

    def __init__(self, root: Path) -> None:
        versions = sorted(p.name for p in (root / "usr/lib/modules").iterdir() if p.is_dir())
        if len(versions) != 1:
            die(f"the kernel package holds {len(versions)} module trees, expected one: {versions}")
        self.root = root
        self.version = versions[0]
        self.moddir = root / "usr/lib/modules" / self.version
        self.files: dict[str, Path] = {}
        for path in sorted(self.moddir.rglob("*.ko*")):
            self.files[_name_of(path)] = path
        self.builtin = {
            _name_of(Path(line.strip()))
            for line in (self.moddir / "modules.builtin").read_text().splitlines()
            if line.strip()
        }
        self._info: dict[str, dict[str, list[str]]] = {}

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.version}"

    def modinfo(self, name: str) -> dict[str, list[str]]:
        if name not in self._info:
            path = self.files[name]
            data = path.read_bytes()
            if path.name.endswith(".xz"):
                data = lzma.decompress(data)
            section = elf.parse(data, want_sections=(".modinfo",)).sections.get(".modinfo", b"")
            info: dict[str, list[str]] = {}
            for item in section.split(b"\0"):
                key, sep, value = item.decode(errors="replace").partition("=")
                if sep:
                    info.setdefault(key, []).append(value)
            self._info[name] = info
        return self._info[name]

    def module(self, name: str) -> Module:
        info = self.modinfo(name)
        deps = sorted({d.replace("-", "_") for v in info.get("depends", []) for d in v.split(",") if d})
        rel = self.files[name].relative_to(self.root)
        return Module(name, PurePosixPath("/") / rel.as_posix(), self.files[name], tuple(deps))

    def _soft_pre(self, name: str) -> list[str]:
        pre: list[str] = []
        for value in self.modinfo(name).get("softdep", []):
            words = value.split()
            if "pre:" in words:
                for w in words[words.index("pre:") + 1 :]:
                    if w.endswith(":"):
                        break
                    pre.append(w.replace("-", "_"))
        return pre

    def load_order(self, wanted: list[str]) -> list[Module]:
        """wanted plus everything they depend on, each after its dependencies, builtins left out."""
        order: list[Module] = []
        seen: set[str] = set()

        def visit(name: str, chain: tuple[str, ...], optional: bool) -> None:
            name = name.replace("-", "_")
            if name in seen or name in self.builtin:
                return
            if name not in self.files:
                if optional:
                    return
                via = " (needed by " + " -> ".join(chain) + ")" if chain else ""
                die(
                    f"kernel {self.version} has no module {name}{via}",
                    hint="check the module name in the profile (`modinfo`-style names, '-' or '_')",
                )
            if name in chain:
                die(f"kernel modules depend on each other in a cycle: {' -> '.join((*chain, name))}")
            for pre in self._soft_pre(name):
                visit(pre, (*chain, name), True)
            mod = self.module(name)
            for dep in mod.depends:
                visit(dep, (*chain, name), False)
            seen.add(name)
            order.append(mod)

        for name in wanted:
            visit(name, (), False)
        return order
