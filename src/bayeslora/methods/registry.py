"""The method registry: ``name -> BayesianMethod subclass``. Adding a method = one file + ``@register_method``."""

from __future__ import annotations

from .base import BayesianMethod, MethodConfig, MethodError

METHODS: dict[str, type[BayesianMethod]] = {}


def register_method(cls: type[BayesianMethod]) -> type[BayesianMethod]:
    """Class decorator: add ``cls`` to :data:`METHODS` under ``cls.name`` (it needs ``name``, ``description`` and a
    ``config_cls`` subclassing :class:`MethodConfig`); a name taken by another class is refused."""
    for attr in ("name", "description", "config_cls"):
        if not getattr(cls, attr, None):
            raise TypeError(f"{cls.__name__} must define `{attr}` to be registered")
    if not issubclass(cls.config_cls, MethodConfig):
        raise TypeError(f"{cls.__name__}.config_cls must subclass MethodConfig")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"Method name {cls.name!r} is already registered by {METHODS[cls.name].__name__}")
    METHODS[cls.name] = cls
    return cls


def get_method_class(name: str) -> type[BayesianMethod]:
    """The registered class of method ``name`` (a :class:`MethodError` listing the registered names if none)."""
    if name not in METHODS:
        raise MethodError(f"Unknown method {name!r}; registered methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def build_method(name: str, options: dict | None = None) -> BayesianMethod:
    """A new method ``name`` with ``options`` over its config's defaults (``bayeslora methods NAME`` lists them);
    an unknown method or option, or a value of the wrong type, is a :class:`MethodError`."""
    cls = get_method_class(name)
    return cls(cls.config_cls.from_dict(options or {}))
