"""Dense bf16 peak FLOP/s per GPU, by a fragment of the device's name: the one table the monitoring
callback's MFU and the planner's GPU kinds both read."""

BF16_PEAK_FLOPS: dict[str, float] = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}
