"""Storage: the tables (``schema``), the database and its transactions (``database``),
named leases (``leases``) and the migrations that keep a database up to date
(``migrate``). Nothing here knows what the rows mean."""

from .database import (
    Bulk,
    Raw,
    Store,
    StoreUnavailable,
    Transaction,
    WalCheckpointer,
    inbox_url_for,
    insert,
    sqlite_url_for,
)

__all__ = [
    "Bulk",
    "Raw",
    "Store",
    "StoreUnavailable",
    "Transaction",
    "WalCheckpointer",
    "inbox_url_for",
    "insert",
    "sqlite_url_for",
]
