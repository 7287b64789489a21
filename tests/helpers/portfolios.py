"""Portfolio files for the pipeline tests: replay tiers over a shared benchmark file."""
from __future__ import annotations

from pathlib import Path


def write_portfolio(path: Path, bench: Path, models: list[str], thresholds: list[float], data="rc-mmlu.jsonl.gz",
                    signal="logprob", names=None, slow_first: bool = False) -> Path:
    """slow_first: the first tier waits each call's recorded latency (work that is still running when a test
    acts on it, whatever the machine's speed)."""
    names = names or [f"t{i}" for i in range(len(models))]
    lines = [f'[policy]\nname = "threshold"\nsignal = "{signal}"\n']
    for i, (name, model) in enumerate(zip(names, models)):
        lines.append(f'[[tiers]]\nname = "{name}"\n'
                     + (f"threshold = {thresholds[i]}\n" if i < len(thresholds) else "")
                     + f'backend = {{ kind = "replay", file = "{bench / data}", model = "{model}"'
                     + (", sleep = true" if slow_first and i == 0 else "") + " }\n")
    path.write_text("\n".join(lines))
    return path
