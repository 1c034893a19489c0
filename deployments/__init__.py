"""Ray Serve deployments and typed application builders (the thin Ray layer)."""
