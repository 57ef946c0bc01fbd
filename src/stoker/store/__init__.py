"""The SQLite database: schema, migrations, queries. The only package with SQL in it."""
