"""Decorator registry of explainers; the catalogue is derived from it, never kept by hand."""

from __future__ import annotations

from typing import TypeVar

from attriflow.explainers.base import Explainer, Family

REGISTRY: dict[str, type[Explainer]] = {}

E = TypeVar("E", bound=type[Explainer])


def register(cls: E) -> E:
    """Register an explainer class under ``cls.spec.name``.

    Parameters
    ----------
    cls : type of Explainer
        Class to register.

    Returns
    -------
    type of Explainer
        The class, unchanged.

    Raises
    ------
    ValueError
        If the name is already taken.
    """
    name = cls.spec.name
    if name in REGISTRY:
        raise ValueError(f"explainer {name!r} is already registered by {REGISTRY[name]!r}")
    REGISTRY[name] = cls
    return cls


def get_explainer(name: str) -> type[Explainer]:
    """Class registered under ``name``; a wrong name lists the valid ones.

    Parameters
    ----------
    name : str
        Registry key.

    Returns
    -------
    type of Explainer
        The explainer class.

    Raises
    ------
    KeyError
        If no explainer has that name.
    """
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown explainer {name!r}; registered: {', '.join(sorted(REGISTRY))}"
        ) from None


def list_explainers(family: Family | str | None = None) -> list[type[Explainer]]:
    """Registered explainers ordered by family then name, optionally of one family.

    Parameters
    ----------
    family : Family, str or None
        Restrict to this family.

    Returns
    -------
    list of type of Explainer
        The classes.
    """
    order = list(Family)
    items = sorted(REGISTRY.values(), key=lambda c: (order.index(c.spec.family), c.spec.name))
    if family is None:
        return items
    return [c for c in items if c.spec.family == Family(family)]
