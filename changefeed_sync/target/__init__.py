"""Target side: client -> follow / webhook -> apply; pull; files."""
