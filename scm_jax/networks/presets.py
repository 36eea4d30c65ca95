"""Size presets. EDM2's six sizes (Karras et al. 2024, Table 2; sCM Table 4-5) differ only in the
base width; everything else (channel_mult (1, 2, 3, 4), 3 blocks, attention at 16 and 8) is shared.
Widths for 28x28 and 32x32 data live in their dataset configs."""

EDM2_CHANNELS = {"xs": 128, "s": 192, "m": 256, "l": 320, "xl": 384, "xxl": 448}
