"""Strict config loading: unknown keys, missing keys, wrong types, nested paths, post-init checks."""

from dataclasses import dataclass, field

import pytest

from pcpc.config import from_dict, load_json
from pcpc.errors import UserError


@dataclass
class Inner:
    betas: tuple[float, float] = (0.9, 0.95)
    name: str | None = None


@dataclass
class Outer:
    steps: int
    lr: float = 1e-3
    flag: bool = False
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


def test_valid_and_defaults():
    cfg = from_dict(Outer, {"steps": 3, "lr": 1, "inner": {"betas": [0.8, 0.9]}})
    assert cfg.steps == 3 and cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.inner.betas == (0.8, 0.9) and cfg.inner.name is None


def test_unknown_key_lists_valid_keys():
    with pytest.raises(UserError, match=r"cfg: unknown key 'stepz'; valid keys: steps, lr, flag, inner"):
        from_dict(Outer, {"steps": 1, "stepz": 2}, where="cfg")


def test_missing_required_key():
    with pytest.raises(UserError, match="missing required key 'steps'"):
        from_dict(Outer, {})


@pytest.mark.parametrize(
    "data, message",
    [
        ({"steps": "3"}, r"config.steps: expected an integer, got str '3'"),
        ({"steps": 1.5}, r"config.steps: expected an integer, got float"),
        ({"steps": True}, r"config.steps: expected an integer, got bool"),
        ({"steps": 1, "lr": "fast"}, r"config.lr: expected a number"),
        ({"steps": 1, "flag": 1}, r"config.flag: expected true or false"),
        ({"steps": 1, "inner": {"betas": [0.9]}}, r"config.inner.betas: expected 2 items, got 1"),
        ({"steps": 1, "inner": {"betas": [0.9, "x"]}}, r"config.inner.betas\[1\]: expected a number"),
        ({"steps": 1, "inner": {"nme": "a"}}, r"config.inner: unknown key 'nme'"),
        ({"steps": 1, "inner": {"name": 3}}, r"config.inner.name: expected str"),
    ],
)
def test_type_errors_name_the_field(data, message):
    with pytest.raises(UserError, match=message):
        from_dict(Outer, data)


def test_post_init_error_is_user_error():
    with pytest.raises(UserError, match=r"config: steps must be >= 1, got 0"):
        from_dict(Outer, {"steps": 0})


def test_load_json_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1,\n "b": }')
    with pytest.raises(UserError, match=r"bad.json: invalid JSON at line 2"):
        load_json(bad)
    arr = tmp_path / "arr.json"
    arr.write_text("[1, 2]")
    with pytest.raises(UserError, match="expected a JSON object at the top level, got list"):
        load_json(arr)
