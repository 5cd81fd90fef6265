"""The `tnflow` command: options parsed into the configuration, a flow called, errors in one line.

`main` holds the commands that run flows, `offline` those that do not (predict, export, gc,
models), `arguments` builds the options from the declared configuration, `console` keeps the
console readable (user errors, interruptions and full disks in one line), `serve` serves the
deployments file.
"""
