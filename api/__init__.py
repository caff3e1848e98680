"""HTTP service: routes, schemas, batching, prediction logging, auth and metrics."""
