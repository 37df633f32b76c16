"""One module per export format, each importing its SDK lazily."""
