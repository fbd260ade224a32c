"""One module per command: check flags, call one library function, hand over the result."""
