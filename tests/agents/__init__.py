"""Test-only agents: ``stoker agent`` with a driver wrapped to widen a race window.

Production code carries no test hooks; a test that needs the agent to behave differently
runs one of these modules instead (``tests.helpers.AgentProcess(module=...)``).
"""
