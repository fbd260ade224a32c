"""The local checkpoint store: format, conversion, listing and loading."""
