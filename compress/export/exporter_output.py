"""What the TorchScript ONNX exporter prints, kept off the terminal, and its failures told in one line.

On a failure the exporter prints the whole TorchScript IR (``Torch IR graph at exception``, easily 100 KB)
from C++ straight to file descriptor 1, which no ``sys.stdout`` swap catches and which breaks ``--json``.
:func:`captured_fds` points descriptors 1 and 2 at a temporary file for the duration; :func:`export_error`
turns the exception (and what was captured) into one line naming the op and what to do.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from compress.errors import CompressError, first_line


class Captured:
    """The text written to stdout/stderr while :func:`captured_fds` was active (filled in on exit)."""

    text: str = ""

    def lines(self) -> list[str]:
        """Its non-empty lines, without the IR dump (indented lines and the graph header)."""
        return [line.strip() for line in self.text.splitlines()
                if line.strip() and not line.startswith((" ", "\t")) and not line.startswith("Torch IR graph")]


@contextmanager
def captured_fds() -> Iterator[Captured]:
    """Redirect file descriptors 1 and 2 (C++ prints included) into a temporary file; restore them on exit."""
    found = Captured()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile(mode="w+b") as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield found
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):  # a closed or broken stream: its text is lost either way
                    pass
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            found.text = sink.read(1 << 20).decode("utf-8", errors="replace")


_UNSUPPORTED = re.compile(r"operator '([^']+)' to ONNX opset version (\d+) is not supported"
                          r"(?:\. Support for this operator was added in version (\d+))?")


def export_error(exc: BaseException, captured: Captured) -> CompressError:
    """One line for an exporter failure: the op and the opset it needs, or the exception's first line
    (with the exporter's last printed line when the exception says nothing)."""
    found = _UNSUPPORTED.search(str(exc))
    if found is not None:
        op, opset, since = found.group(1), found.group(2), found.group(3)
        if since is not None:
            return CompressError(f"ONNX export failed: {op} has no ONNX export at opset {opset}; the exporter has it "
                                 f"from opset {since}: set the opset to {since} (recipe: onnx.opset) or replace {op} "
                                 "in the model")
        return CompressError(f"ONNX export failed: {op} has no ONNX export at opset {opset} (nor at any opset this "
                             "torch knows); replace it in the model or register a symbolic for it "
                             "(torch.onnx.register_custom_op_symbolic)")
    line = first_line(exc)
    printed = captured.lines()
    if line == type(exc).__name__ and printed:
        line = f"{line}: {printed[-1]}"
    return CompressError(f"ONNX export failed: {line}")
