"""The one exception every config check raises (its own module, so ``io`` and ``validate``
both import it and neither imports the other's caller)."""

from __future__ import annotations


class ConfigError(ValueError):
    """One or more problems in a configuration, each a single line naming its dotted key."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        if len(self.problems) == 1:
            super().__init__(self.problems[0])
        else:
            super().__init__(f"invalid configuration ({len(self.problems)} problems):\n"
                             + "\n".join(f"  - {p}" for p in self.problems))
