"""The project's own error type: raised for bad user input, with a message that says
what was expected, what came, and how to fix it."""


class SparsemergeError(ValueError):
    """Bad input or a failed check that the user can act on."""


class PatternViolation(SparsemergeError):
    """A tensor does not conform to the sparsity pattern it claims."""


def options_error(what: str, exc: Exception, flags: "dict[str, str] | None" = None) -> SparsemergeError:
    """One line for a pydantic ``ValidationError`` of a command's options: ``invalid pack
    options: --group-size: Input should be greater than or equal to 0 (got -5)``. Fields are
    named by their flag (``group_size`` -> ``--group-size``, or ``flags[field]``); an error
    that is itself a :class:`SparsemergeError` (a custom validator) is passed through."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return exc if isinstance(exc, SparsemergeError) else SparsemergeError(f"invalid {what}: {exc}")
    parts = []
    for err in errors():
        inner = (err.get("ctx") or {}).get("error")
        if isinstance(inner, SparsemergeError):
            return SparsemergeError(f"invalid {what}: {inner}")
        loc = [str(x) for x in err.get("loc", ())]
        field = loc[0] if loc else ""
        name = (flags or {}).get(field) or (f"--{field.replace('_', '-')}" if field else "value")
        where = ".".join([name, *loc[1:]])
        got = repr(err.get("input"))
        got = got if len(got) <= 40 else got[:37] + "..."
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{where}: {msg} (got {got})")
    return SparsemergeError(f"invalid {what}: " + "; ".join(parts))
