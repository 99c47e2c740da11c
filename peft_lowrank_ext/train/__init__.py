"""The training tool behind the command line: data, the loop, SFT, rank histories and figures."""
