"""The HTTP layer: blueprints, schemas, error rendering. No torch here."""
