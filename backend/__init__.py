"""HSAE Forest backend: the database schema and sessions, queries, the FastAPI app and its templates."""
