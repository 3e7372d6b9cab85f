"""The scale wing: fold workers (one process per GPU), DDP under torchrun, sharded prediction."""
