"""Stand-in for ``flash_attn.utils`` (only ``distributed`` is provided)."""
