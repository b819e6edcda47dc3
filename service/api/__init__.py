"""HTTP layer: schemas, routes, auth and the one place errors become HTTP responses."""
