"""Capabilities, one module each, wired together by the agent."""
