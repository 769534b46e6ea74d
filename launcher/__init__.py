"""What `deepspeed` runs on every rank (distill.py), installed as mlc.launcher."""
