"""msgspec structs of the HTTP API, one module per topic."""
