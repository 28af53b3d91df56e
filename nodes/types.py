"""Custom socket types, declared once."""
CONCEPT_ERASURE = "CONCEPT_ERASURE"
CATEGORY = "concept_erasure"
ERASURE_SETTINGS = "CONCEPT_ERASURE_SETTINGS"
