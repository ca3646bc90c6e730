"""The web front-end: a Falcon app on waitress that forwards every queue operation."""
