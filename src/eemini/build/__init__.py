"""The image builder: pinned Debian inputs -> initramfs -> UKI -> per-profile disk images."""
