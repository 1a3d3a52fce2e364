"""Fleet simulator, demo and benchmarks. Uses only the public entry points of the other packages."""
