"""The database: typed models (models.py), engines and the schema-version check (session.py), Alembic glue
(migrate.py). The migrations under <repo>/alembic are the only thing that creates or changes the schema."""
