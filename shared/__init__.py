"""What the web front-end and the storage worker both import: protocol, config, errors."""
