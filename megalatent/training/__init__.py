"""The training loop: optimizer and schedules, loss, FLOP/MFU accounting, logging."""
