"""The one exception type users see: a short paragraph naming the key or file and the fix."""


class LmlabError(Exception):
    """A user-facing error. The CLI prints its message without a traceback and exits with 2."""


def config_error(key: str, problem: str, fix: str) -> LmlabError:
    return LmlabError(f"config key '{key}': {problem}. {fix}")


def file_error(path: object, problem: str, fix: str, line: int | None = None) -> LmlabError:
    where = f"{path}, line {line}" if line is not None else f"{path}"
    return LmlabError(f"{where}: {problem}. {fix}")
