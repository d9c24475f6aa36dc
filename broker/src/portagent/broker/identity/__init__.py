"""Who is asking: OIDC ID tokens (GitHub Actions, Buildkite, people) and admin
credentials, verified once into an `Identity` (see ADR 0008)."""
