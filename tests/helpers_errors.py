"""Assertion helper shared by the bad-input tests."""

import pytest


def one_line_error(exc_type: type[Exception], fn, *args, **kwargs) -> str:
    """Call ``fn``, expect ``exc_type``, and return its message after checking it is one line."""
    with pytest.raises(exc_type) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message
