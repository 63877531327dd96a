"""Recipes built on the idefics2 package; run from the repository root (`python -m recipes...`)."""
