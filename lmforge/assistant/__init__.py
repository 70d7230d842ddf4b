"""The customer-service assistant: an application built on lmforge's layers.

`db` is the one database interface (SQLite by default, PostgreSQL for deployment);
`orders` the demo store's orders and the read-only look-ups the assistant's tools call.
"""
