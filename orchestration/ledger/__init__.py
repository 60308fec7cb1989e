"""The ledger: an append-only SHA-256 hash chain of everything that happened.

Every layer writes its records with ``ledger_append`` inside its own transaction, so a change and
its record commit together or not at all. References are plain ids, never foreign keys, so nothing
can cascade into the ledger.
"""
