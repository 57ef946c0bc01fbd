"""``stoker agent`` whose manifest applies wait after each step: ``python -m
tests.agents.slow_apply``.

An apply of a few VMs takes milliseconds; the wait (``SLOW_APPLY_DELAY_S`` seconds, required)
stretches it so a test can kill the agent in the middle of one, between two steps it knows
were done. Everything else is the agent as ``stoker agent`` builds it from its config file
(``STOKER_CONFIG``) and ``STOKER_*``.
"""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from stoker import logs
from stoker.agent import Agent
from stoker.config import ConfigError, load_config
from stoker.manifest import Step
from stoker.services.container import Services
from stoker.services.manifests import ManifestService

DELAY_ENV = "SLOW_APPLY_DELAY_S"


class SlowManifests(ManifestService):
    """The agent's manifest service, sleeping after every step it carries out."""

    def __init__(self, delay_s: float, original: ManifestService) -> None:
        vars(self).update(vars(original))  # the same services, store, lock and events
        self.delay_s = delay_s

    async def carry_out(self, step: Step) -> str | None:
        done = await super().carry_out(step)
        await asyncio.sleep(self.delay_s)
        return done


@dataclass
class SlowApplyAgent(Agent):
    delay_s: float = 0.0

    def build(self) -> Services:
        services = super().build()
        self.services = replace(services, manifests=SlowManifests(self.delay_s, services.manifests))
        return self.services


def main() -> int:
    config_path = os.environ.get("STOKER_CONFIG")
    try:
        delay_s = float(os.environ[DELAY_ENV])
        cfg = load_config(Path(config_path) if config_path else None)
    except (KeyError, ValueError):
        print(f"error: set {DELAY_ENV} to the seconds to wait after each step", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    logs.setup(cfg.log.level, cfg.log.format)
    try:
        asyncio.run(SlowApplyAgent(cfg, delay_s=delay_s).run())
    except (ConfigError, OSError) as exc:
        print(f"error: the agent could not start: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
