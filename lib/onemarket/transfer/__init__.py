"""Moving image bytes: sources to read from, hashing while copying, progress."""
