"""Use cases: each joins authorization, the store and the audit log in one transaction."""
