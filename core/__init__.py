"""Ground floor: settings, the database, redaction and shared helpers; imports nothing of the product above it."""
