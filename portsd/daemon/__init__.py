"""The build host: the daemon, its state, events, watcher, and its HTTP server."""
