"""Click commands other than run/validate/init, each in its own module, imported lazily."""
