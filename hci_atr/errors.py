"""The project's exception types.

Every error a user can cause (bad files, bad columns, bad configs, bad requests) is raised as a subclass of
:class:`HciAtrError` with a message that names the file / row / field and says what to do. The CLI prints such an error
on one line and exits non-zero; the HTTP app maps it to a 4xx JSON body. The library knows nothing of HTTP: which
status a type maps to is the serving app's decision.
"""


class HciAtrError(Exception):
    """Base class: an error caused by input the user can fix."""


class ConfigError(HciAtrError):
    """A configuration file, flag or value is invalid."""


class DataError(HciAtrError):
    """A dataset file (CSV, JSONL, parquet) is missing, malformed or inconsistent."""


class AudioError(DataError):
    """An audio file cannot be decoded or is unusable."""


class ModelLoadError(HciAtrError):
    """A model, tokenizer or checkpoint cannot be found or does not fit the configuration."""


class CaptionerError(HciAtrError):
    """A captioner backend failed for a clip or could not be set up."""


class NotFoundError(HciAtrError):
    """A named item (e.g. a clip id) is not in the collection."""


class QueryError(HciAtrError):
    """A search query or its options are unusable (empty text, top_k out of range, nothing to search)."""



def one_line(exc: BaseException | str, limit: int = 500) -> str:
    """One line for a person: a project error's message or a string as it is, another exception as
    ``"ExcType: first line"``; whitespace collapsed, at most ``limit`` characters. What the CLI prints, the
    pipelines' error tables hold and the HTTP app logs."""
    if isinstance(exc, HciAtrError):
        msg = str(exc) or type(exc).__name__
    elif isinstance(exc, BaseException):
        text = str(exc).strip()
        head = text.splitlines()[0] if text else ""
        msg = f"{type(exc).__name__}: {head}" if head else type(exc).__name__
    else:
        msg = str(exc)
    return " ".join(msg.split())[:limit]
