"""One module a DVC stage; each imports only `tuneforge.core` (never another stage)."""
