"""The package version, on its own so that any layer can name it without importing the
package face (pyproject.toml reads it from here too)."""

__version__ = "0.1.0"
