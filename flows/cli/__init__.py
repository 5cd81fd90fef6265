"""The `tnflow` command: options parsed into the configuration, a flow called, errors in one line.

`main` holds the commands, `parser` builds the options from the declared configuration,
`console` keeps the console readable, `serve` serves the deployments file.
"""
