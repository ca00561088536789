"""Algorithm steps as pure functions: one module, one public verb, one result."""
