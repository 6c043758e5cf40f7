"""Reading the files a user names: regular files only, opened so that nothing blocks (a FIFO without a writer) and
no device or socket is ever opened; and the one reader of list files — the corpus lists of `fvkernels train|extract`
and UCF101's split and class files — whose errors name the file and line."""
from __future__ import annotations

import os
import re
import stat
from typing import BinaryIO, Callable, Iterator, Optional, Tuple, TypeVar

Parsed = TypeVar("Parsed")

_KINDS = ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISCHR, "character device"),
          (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))


class NotARegularFile(ValueError):
    """A path that names a folder, FIFO, device or socket where a regular file was expected."""


def file_kind(mode: int) -> str:
    """What st_mode says a path is, in words."""
    return next((kind for test, kind in _KINDS if test(mode)), "regular file" if stat.S_ISREG(mode) else "special file")


def open_regular_file(path, expected: str) -> BinaryIO:
    """`path` opened for binary reading, if it is a regular file (symbolic links followed); otherwise
    NotARegularFile "'<path>' is a <kind>, not a regular file; <expected>". The kind is checked before the open
    (opening a device can act on it) and again on the open descriptor, opened non-blocking: a FIFO swapped in
    between cannot make the reader wait for a writer that never comes."""
    kind = file_kind(os.stat(path).st_mode)
    if kind != "regular file":
        raise NotARegularFile(f"{str(path)!r} is a {kind}, not a regular file; {expected}")
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    kind = file_kind(os.fstat(descriptor).st_mode)
    if kind != "regular file":
        os.close(descriptor)
        raise NotARegularFile(f"{str(path)!r} is a {kind}, not a regular file; {expected}")
    return os.fdopen(descriptor, "rb")  # O_NONBLOCK does not change how a regular file reads


def is_ascii_number(text: str) -> bool:
    """Whether text is a non-negative integer in ASCII digits: str.isdigit() also accepts '²' (which int() refuses)
    and Arabic-Indic digits (which int() reads as numbers nobody wrote in ASCII)."""
    return re.fullmatch(r"[0-9]+", text) is not None


def list_file_lines(path, what: str, form: str, parse: Callable[[str], Parsed]) -> Iterator[Tuple[int, Parsed]]:
    """(line number, parse(line)) of each non-blank line of the list file `path`, `what` it is and the `form` of its
    lines named in errors. The file must be a regular file of UTF-8 text (a leading byte-order mark is dropped);
    a ValueError of parse(line) becomes "path:line: <its message>; expected <form>, got '<line>'"."""
    expected = f"{what} must be a file with one {form} per line"
    with open_regular_file(path, expected) as handle:
        data = handle.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x}); {expected}, saved as "
                         "UTF-8") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            parsed = parse(line)
        except ValueError as error:
            raise ValueError(f"{path}:{number}: {error}; expected {form}, got {line!r}") from None
        yield number, parsed


def whitespace_fields(*counts: int, number_at: Optional[int] = None, minimum: int = 0) -> Callable[[str], list]:
    """A parse for list_file_lines of lines of one of `counts` whitespace-separated fields, the one at `number_at`
    (when present) a whole number ≥ minimum in ASCII digits, returned as an int."""
    def parse(line: str) -> list:
        fields = line.split()
        if len(fields) not in counts:
            raise ValueError(f"{len(fields)} fields")
        if number_at is not None and number_at < len(fields):
            if not is_ascii_number(fields[number_at]) or int(fields[number_at]) < minimum:
                raise ValueError(f"{fields[number_at]!r} is not a whole number ≥ {minimum} in ASCII digits")
            fields[number_at] = int(fields[number_at])
        return fields

    return parse
