"""Query functions behind the API: each takes an ``AsyncConnection`` and plain arguments.

Grouped by subject (``features``, ``cql2``, ``locate``, ``nearest``) so tests and benchmarks
call them without HTTP; the routes only parse parameters and wrap the answers.
"""
