"""The daemon's HTTP surface (aiohttp): repository files, JSON API, events, page, metrics."""
