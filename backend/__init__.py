"""The ride API: instant coarse estimate, accurate duration through the Pub/Sub stream."""
