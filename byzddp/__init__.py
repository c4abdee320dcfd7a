"""byzddp: a torch.distributed harness for Byzantine-robust learning on non-iid data."""
__version__ = "0.1.0"
