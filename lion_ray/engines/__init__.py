"""Ray plumbing: API actors and the global limiter, student inference, the Ray Train loop,
the Serve app, and cluster helpers. Each Ray shell wraps a plain class that does the work."""
