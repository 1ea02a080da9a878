"""Guest code that must never be in a production image: the folder names the danger.

The simulated attestation backend (quotes signed by a published development chain, with its
P-256 and DER code), boot config on the kernel command line, and the dev-mode runner
(`eemini dev`). Only `local-dev` images carry this folder; the builder leaves it out of every
other profile. No guest module outside it imports it, except PID 1 (and its boot config) in an
image built for simulated attestation.
"""
