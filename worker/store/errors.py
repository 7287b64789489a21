"""The database's errors as the other layers catch them, so that only the store
imports the database library (the store's contract in .importlinter)."""
from sqlalchemy.exc import InterfaceError, OperationalError, StatementError

__all__ = ["InterfaceError", "OperationalError", "StatementError"]
