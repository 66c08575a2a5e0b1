"""A name -> builder registry filled by a decorator (models, rewards)."""

from __future__ import annotations


class Registry(dict):
    """`@REGISTRY.register(name)` adds a builder; `lookup(name)` returns it, or raises a ValueError listing the
    registered names."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str):
        def decorator(builder):
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self[name] = builder
            return builder

        return decorator

    def lookup(self, name: str):
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; registered: {sorted(self)}")
        return self[name]
