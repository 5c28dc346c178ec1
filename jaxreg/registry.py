"""Name -> component lookup, resolved once from the config.

Every configurable component (norms, models, schedules, augmentations) is
looked up by name here so that an unknown name fails early with the list of
valid choices, instead of deep inside a traced function.
"""
from __future__ import annotations

from typing import Callable, Dict, Generic, Iterable, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
  """A named collection of components of one kind."""

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: Dict[str, T] = {}

  def register(self, name: str) -> Callable[[T], T]:
    """Decorator registering `obj` under `name`."""

    def deco(obj: T) -> T:
      if name in self._entries:
        raise ValueError(f"{self.kind} {name!r} is registered twice")
      self._entries[name] = obj
      return obj

    return deco

  def add(self, name: str, obj: T) -> T:
    return self.register(name)(obj)

  def get(self, name: str) -> T:
    try:
      return self._entries[name]
    except KeyError:
      raise ValueError(
          f"unknown {self.kind} {name!r}; valid choices: "
          f"{', '.join(sorted(self._entries))}") from None

  def names(self) -> list[str]:
    return sorted(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def __iter__(self) -> Iterable[str]:
    return iter(self.names())


def check_kwargs(kind: str, name: str, given: dict, allowed: Iterable[str]):
  """Refuses keyword arguments a component does not take, naming the valid ones."""
  allowed = set(allowed)
  unknown = sorted(set(given) - allowed)
  if unknown:
    raise ValueError(
        f"{kind} {name!r} does not take {', '.join(unknown)}; it accepts: "
        f"{', '.join(sorted(allowed)) or '(no options)'}")
