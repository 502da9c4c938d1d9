"""Persistence: the SQL schema and database access, and the blob stores for image files."""
