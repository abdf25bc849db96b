"""Power control of nodes through their BMCs, and rollouts that use it."""
