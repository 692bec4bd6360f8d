"""Alembic: the environment (env.py) and the frozen revisions (versions/)."""
