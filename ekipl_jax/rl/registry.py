"""Named variants of the RL step (after tunix's rl/function_registry.py, kept small): one Registry per kind, a dict
from name to function filled by a decorator. A new variant is one function and one decorator; config validation
and configs/ablations.py read the names from here.

  TREATMENTS = registry.Registry("rl.external_treatment")

  @TREATMENTS.register("paper")
  def paper(t, cfg): ...

  TREATMENTS.lookup(cfg.external_treatment)   # the function, or a ValueError naming the config key
"""

from __future__ import annotations

from typing import Any, Callable


class Registry(dict):
  """name -> function; `info[name]` holds the keyword attributes given at registration (e.g. reads_store)."""

  def __init__(self, config_key: str):
    super().__init__()
    self.config_key = config_key  # the config key whose value names an entry (for error messages)
    self.info: dict[str, dict[str, Any]] = {}

  def register(self, name: str, **info) -> Callable[[Callable], Callable]:
    def add(fn: Callable) -> Callable:
      if name in self:
        raise ValueError(f"{self.config_key}: {name!r} is registered twice")
      self[name], self.info[name] = fn, info
      return fn

    return add

  def lookup(self, name: str) -> Callable:
    if name not in self:
      raise ValueError(f"config key {self.config_key}: unknown value {name!r} (one of {' | '.join(self)})")
    return self[name]

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(self)
