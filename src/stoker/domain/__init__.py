"""Pure rules of stoker: data and functions with no I/O, no asyncio; the clock is a parameter."""
