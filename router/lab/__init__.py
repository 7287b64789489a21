"""The offline lab: labelled data, simulation, tuning, metrics and reports.

It sits beside the decision core and replays policies through the very same
`router.core.cascade` code the workers run. Nothing in the runtime (the core, or
`worker` outside the `cascade` command) imports it: enforced by `.importlinter`.
"""
