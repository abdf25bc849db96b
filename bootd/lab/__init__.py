"""`bootd lab`: throw-away namespace networks, QEMU VMs and the test image recipe."""
