"""Intel TDX quotes: parsing (layout, quote), verification (verify, policy) and rendering (describe)."""
