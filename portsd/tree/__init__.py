"""A ports tree in git: objects, recipes loaded by tree id, checkouts."""
