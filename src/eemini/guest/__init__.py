"""The guest runtime: PID 1 inside the VM, or an ordinary process in dev mode.

Standard library only (plus ctypes): the builder ships this package and the standard-library
modules its import analysis finds (eemini.build.pyruntime); guest/dev/ never goes into a
production image.

The lean-import rule. Under emulation (TCG, where local images and the tests boot) importing a
module costs about 25 times its native time, so the modules PID 1 imports on its way to the
workload do without the standard library's heavier conveniences, and nothing here says so again:

- `typing` is for type checkers only: `TYPE_CHECKING = False` then `if TYPE_CHECKING:` (which
  mypy takes as true), with `from __future__ import annotations` so that no annotation is
  evaluated; Protocols and TypeVars are declared inside that block too.
- `eemini.guest.record` stands in for `dataclasses` (which imports `inspect`, `ast` and `dis`
  and compiles every class's methods with `exec`).
- `eemini.guest.loop` stands in for `asyncio` and `selectors`: `select.epoll` directly.
- `_socket`, the C core of the socket module, stands in for `socket` (whose enums and
  `selectors` the guest does not need).
- `eemini.guest.wirejson` stands in for `json`: the same C codec, without json.decoder's
  regular expressions and with them `re` (json's messages come along only with an error).
- Nor `queue`, `random`, `hmac`, `base64` or `contextlib`: a deque under a Condition,
  `os.urandom`, `_operator._compare_digest`, `binascii` and try/except do their work.
- `traceback` is imported where an error is being reported, never before.

tests/test_guest_imports.py holds the boot path to this.
"""
