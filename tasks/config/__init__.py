"""Config: the declared options, the small specs each stage takes, and the backbone table.

`options` is the one configuration the CLI, the flows and the deployments share (`scoring`
holds the scoring and watching commands'); its tables live beside it: the datasets
(`datasets`), the presets and the defaults that follow other options (`presets`), and the
checks, as types and across options (`checks`); `specs` are
the frozen values stages take from it; `parameters` turns the options into flow signatures
and one-line errors, and reads a field's type for the command line (`flows/cli/arguments.py`
builds the options) and a sweep's grid; `backbones` is the zoo as a table; `sweeps` is a sweep's
options, the ranges `--random` draws from, and the trials they make.

May import: tasks.core.
"""
