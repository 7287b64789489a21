"""The decision core: what a worker loads to decide.

Pure: no Celery, database, HTTP or plotting. Every policy decides through one
interface (`policy.Policy`: plan before any call, decide after each) driven by
`cascade.start`/`cascade.step`, which the workers and the offline lab both call,
so what the lab reports is what the workers do. Enforced by `.importlinter`.
"""
