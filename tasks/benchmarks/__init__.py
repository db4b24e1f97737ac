"""`versvideo bench NAME`: each benchmark compares against a named baseline in the same run."""
