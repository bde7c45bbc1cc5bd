"""Who is calling (bearer tokens) and what they may do (pure rules)."""
