"""The dashboard's one error type."""


class DashboardError(RuntimeError):
    """The site cannot be built as asked; the message says what to do."""
