"""Training-time machinery under any loop: optimizer-step hooks, data-parallel helpers, load-time file checks."""
