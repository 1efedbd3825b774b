"""A registry of plug-in classes of one kind (regularisers, ensemble methods): a dict from name to
class whose `register` is the class decorator. Registration order is kept (it fixes, for instance,
the order in which regularisers draw random numbers)."""
from __future__ import annotations


class Registry(dict):
    def __init__(self, kind: str, name_attr: str):
        super().__init__()
        self.kind, self.name_attr = kind, name_attr

    def register(self, cls: type) -> type:
        name = getattr(cls, self.name_attr)
        if self.get(name, cls) is not cls:
            raise ValueError(f"a {self.kind} named {name!r} is already registered ({self[name].__name__})")
        self[name] = cls
        return cls
