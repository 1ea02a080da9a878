"""The guest runtime: PID 1 inside the VM, or an ordinary process in dev mode.

Standard library only (plus ctypes): this package is trimmed into the image by import analysis.
"""
