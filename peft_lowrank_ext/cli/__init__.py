"""``python -m peft_lowrank_ext``: compare, train, export and inspect from the command line (``main``)."""
