"""YAML as configs are written today: `1e-4` is a number.

PyYAML implements YAML 1.1, where a float needs a dot (`1.0e-4`): `learning_rate: 1e-4` read as the
string "1e-4". Typed fields convert it back, but a value kept as written (a sweep's list of choices)
stayed a string. YAML 1.2, and every other YAML reader users meet, take it as a float.
"""

from __future__ import annotations

import re

import yaml


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def safe_load(text: str):
    """`yaml.safe_load`, with exponent floats without a dot (`1e-4`, `3E5`) read as floats."""
    return yaml.load(text, Loader=_Loader)
