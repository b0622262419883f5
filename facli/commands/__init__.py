"""The Typer commands, one module each and thin: options in, the result out, the work elsewhere.

A command module imports at its top only what its signature and its argument checks need, and
the work (the modules that bring torch and transformers) inside the command, so that
`facli --help` and `facli CMD --help` start without them.
"""
