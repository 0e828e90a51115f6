"""Alembic migrations of the audit database, installed as ``safeguard.migrations`` (see ``safeguard.db.alembic_config``)."""
