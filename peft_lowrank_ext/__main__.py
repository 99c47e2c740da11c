"""``python -m peft_lowrank_ext``: the command line of :mod:`peft_lowrank_ext.cli.main`."""

import sys

from peft_lowrank_ext.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
