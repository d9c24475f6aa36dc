"""Who may open what: a Cedar policy file, validated at start and on reload, decides
each access request (see ADR 0008 and docs/policy.md)."""
