"""Building: sources, the sandbox, one build, the pipeline to a package, the scheduler."""
