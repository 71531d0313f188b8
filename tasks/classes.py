"""Class names: given as a list, read from a file, or ImageNet's from torchvision's metadata."""

from __future__ import annotations

from pathlib import Path


class ClassNamesError(ValueError):
    """Class names that cannot be read; the message names the config field and the file."""


def class_names(value: list[str] | tuple[str, ...] | str, field: str) -> tuple[str, ...]:
    """The class names a config field gives.

    Parameters
    ----------
    value : list of str, or str
        The names themselves; ``"imagenet"`` for the 1000 ImageNet-1k names in output order
        (torchvision's ``_IMAGENET_CATEGORIES``, shipped with torchvision, nothing is
        downloaded); any other string is a UTF-8 text file with one name a line (surrounding
        spaces stripped, empty lines ignored).
    field : str
        The config field, for error messages (``model.classes``).

    Returns
    -------
    tuple of str
        The names, index i being class i.

    Raises
    ------
    ClassNamesError
        If the file cannot be read, holds no name, or a name is repeated.
    """
    if isinstance(value, str):
        if value == "imagenet":
            from torchvision.models._meta import _IMAGENET_CATEGORIES

            return tuple(_IMAGENET_CATEGORIES)
        path = Path(value)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            why = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
            raise ClassNamesError(f"{field}: cannot read class-name file {value!r} ({why}); give a list, "
                                  "'imagenet' or a text file with one name a line") from None
        names = tuple(line.strip() for line in text.splitlines() if line.strip())
        source = f"{field} file {value!r}"
    else:
        names = tuple(str(v) for v in value)
        source = field
    if not names:
        raise ClassNamesError(f"{source}: no class name")
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise ClassNamesError(f"{source}: class name {name!r} appears twice (lines/entries "
                                  f"{seen[name] + 1} and {i + 1})")
        seen[name] = i
    return names
