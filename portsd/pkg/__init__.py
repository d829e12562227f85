"""Packages and repositories: archives, package files, signatures, the signed repository."""
