"""The one reader of list files: the corpus lists of `fvkernels train|extract` and UCF101's split and class files."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, List, Sequence, Tuple


def list_file_lines(path, what: str, form: str, valid: Callable[[Sequence[str]], bool], *, note: str = ""
                    ) -> Iterator[Tuple[int, List[str]]]:
    """(line number, whitespace-separated fields) of each non-blank line of the list file `path`, `what` it is and
    the `form` of its lines named in errors: a line whose fields are not valid(fields) raises
    "path:line: expected <form>, got '<line>'<note>"."""
    if Path(path).is_dir():
        raise ValueError(f"{str(path)!r} is a folder; {what} must be a file with one {form} per line")
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if not valid(fields):
            raise ValueError(f"{path}:{number}: expected {form}, got {line!r}{note}")
        yield number, fields
