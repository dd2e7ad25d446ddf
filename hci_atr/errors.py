"""The project's exception types.

Every error a user can cause (bad files, bad columns, bad configs, bad requests) is raised as a subclass of
:class:`HciAtrError` with a message that names the file / row / field and says what to do. The CLI prints such an error
on one line and exits non-zero; the HTTP app maps it to a 4xx JSON body.
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


class ClusterError(HciAtrError):
    """The Ray cluster named by --cluster cannot be reached or refused the job."""


class RequestError(HciAtrError):
    """A request to the serving app is invalid (maps to HTTP 4xx)."""

    def __init__(self, message: str, status_code: int = 400):
        super().__init__(message)
        self.status_code = status_code
