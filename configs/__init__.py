"""The DeepSpeed configs (deepspeed/*.json) and example recipes (recipes/*.yaml), installed as mlc.configs."""
