"""What touches the host kernel: processes, pidfds, cgroups, tc, TAP devices, disk space."""
