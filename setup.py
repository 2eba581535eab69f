"""Package discovery for the package-dir mapping of pyproject.toml (``core`` is ``polyrl``,
``plugins`` is ``polyrl.plugins``, ``rewards`` is ``polyrl.rewards``): every sub-package of the
mapped directories is found, so that a new one needs no edit here. Everything else is in
pyproject.toml."""

from setuptools import find_packages, setup

ROOTS = {"polyrl": "core", "polyrl.plugins": "plugins", "polyrl.rewards": "rewards"}


def packages() -> list[str]:
    found = []
    for name, folder in ROOTS.items():
        found.append(name)
        found += [f"{name}.{sub}" for sub in find_packages(where=folder)]
    return sorted(set(found))


setup(packages=packages())
