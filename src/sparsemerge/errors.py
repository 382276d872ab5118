"""The project's own error type: raised for bad user input, with a message that says
what was expected, what came, and how to fix it."""


class SparsemergeError(ValueError):
    """Bad input or a failed check that the user can act on."""


class PatternViolation(SparsemergeError):
    """A tensor does not conform to the sparsity pattern it claims."""
