"""The ``stoker`` command line: Typer commands that talk to the agent only through the client."""
