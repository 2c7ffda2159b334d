"""FHIR R4 Questionnaire and QuestionnaireResponse over the studies' codebooks and responses."""
