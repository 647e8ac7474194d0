"""Auto Text Generator: attribute, analogous, synonym and one-to-one texts from an LLM and WordNet."""
