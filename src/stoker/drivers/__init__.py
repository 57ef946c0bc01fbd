"""Hypervisor drivers behind one protocol; they act, they never decide policy."""
