"""EasyEnclave Mini: a minimal Intel TDX confidential-VM runtime. Boot, attest, run."""

__version__ = "0.1.0"
